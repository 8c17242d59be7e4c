"""recbole-vlm2rec: VLM2Rec as a RecBole 1.2.1 plugin."""
__version__ = "0.1.0"
