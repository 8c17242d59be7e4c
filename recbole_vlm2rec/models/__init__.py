"""Our RecBole models (registered by name in ``recbole_vlm2rec/__init__.py``)."""
