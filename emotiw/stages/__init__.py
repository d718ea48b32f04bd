"""The pipeline stages, one module each; emotiw/__init__.py exports their functions."""
