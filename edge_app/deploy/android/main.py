"""Android entry point: python-for-android starts main.py; it opens the app on the bundled model."""
import glob
import os
import sys

from edge_app.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))
(MODEL,) = glob.glob(os.path.join(HERE, "model", "*.tflite"))
sys.exit(main(["app", "--model", MODEL]))
