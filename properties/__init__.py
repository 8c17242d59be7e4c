"""Default RecBole property files shipped with recbole-vlm2rec.

``model/<Model>.yaml`` holds each of our models' defaults (loaded with RecBole's internal
priority, so config files, config dicts and the command line override them);
``dataset/<name>.yaml`` holds settings for the datasets we ship or document.
Installed as the package data ``recbole_vlm2rec.properties``.
"""
