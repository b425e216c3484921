"""Reference numbers from the paper's tables (Sarnthein et al. 2023; see shared/PAPER.md), in %.

Keyed by (probe, dataset, model) -> {role: accuracy}; "pixels" has no model (key "").
The students' numbers are each run's best epoch on the test set (the paper's protocol):
like for like with probe-table_<probe>_paper; the pixel numbers are the k-NN / linear probe
on the normalised pixels (the paper's "input" row), the teachers' need no selection.
"""

LINEAR = {
    ("cifar10", "resnet18"): {"teacher": 35.50, "student": 46.02},
    ("cifar10", "vgg11"): {"teacher": 36.55, "student": 51.98},
    ("cifar10", ""): {"pixels": 39.02},
    ("cifar100", "resnet18"): {"teacher": 11.58, "student": 21.50},
    ("cifar100", "vgg11"): {"teacher": 12.05, "student": 26.62},
    ("cifar100", ""): {"pixels": 14.07},
    ("stl10", "resnet18"): {"teacher": 24.24, "student": 40.58},
    ("stl10", "vgg11"): {"teacher": 24.67, "student": 46.20},
    ("stl10", ""): {"pixels": 31.51},
    ("tinyimagenet", "resnet18"): {"teacher": 4.85, "student": 10.40},
    ("tinyimagenet", "vgg11"): {"teacher": 5.25, "student": 12.88},
    ("tinyimagenet", ""): {"pixels": 3.28},
}
KNN = {
    ("cifar10", "resnet18"): {"teacher": 37.65, "student": 44.67},
    ("cifar10", "vgg11"): {"teacher": 44.92, "student": 51.32},
    ("cifar10", ""): {"pixels": 33.61},
    ("cifar100", "resnet18"): {"teacher": 13.77, "student": 20.22},
    ("cifar100", "vgg11"): {"teacher": 18.10, "student": 23.53},
    ("cifar100", ""): {"pixels": 14.87},
}
PAPER = {"linear": LINEAR, "knn@20": KNN}


def reference(probe: str, dataset: str, model: str, role: str) -> float | None:
    table = PAPER.get(probe, {})
    key = (dataset, "" if role == "pixels" else model)
    return table.get(key, {}).get(role)
