"""CXR Insight core library: data, preprocessing, models, training, evaluation and inference.

Usable from scripts, tests and notebooks; nothing here imports Streamlit except ``core.ui``.
"""

__version__ = "0.1.0"
