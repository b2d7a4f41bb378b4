"""Dataset ingestion: any supported layout -> labelled, patient-split, readable records.

    from train.data import load_dataset
    dataset = load_dataset("../shared/data/cxr", task="3class")
    print(dataset.summary())

No TensorFlow here: the data tools must import fast and work without it.
"""
from train.data.dataset import Dataset, IngestReport, load_dataset
from train.data.labels import TASKS
from train.data.records import Record

__all__ = ["Dataset", "IngestReport", "Record", "TASKS", "load_dataset"]
