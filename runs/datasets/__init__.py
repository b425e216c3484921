"""One module per dataset family; each registers its loaders in `runs.datasets.base.DATASETS`.

The public entry is `runs.data` (`load_dataset`, `dataset_info`); import from there.
"""
