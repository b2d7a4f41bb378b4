"""cxr-edge training: data ingestion, models, training and evaluation (TensorFlow / tf_keras).

tensorflow-model-optimization only works with Keras 2, so every model is built with
`tf_keras`, and TensorFlow must see TF_USE_LEGACY_KERAS=1 before it is first imported.
Importing this package sets it; nothing here imports TensorFlow eagerly, so the data
tools stay fast and usable without it.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
