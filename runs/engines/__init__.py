"""The training engines: the loops that make checkpoints, above the base of `runs`.

    engine.py       what the engines share: model preparation (channels_last, DDP,
                    torch.compile), the step clock, the training loader, resume, NaN guards
    train.py        supervised training (`python -m runs.train`; its door is runs/train.py)
    distill.py      random-teacher distillation (`python -m runs.distill`)
    distributed.py  data parallel under torchrun
    masking.py      fixed sparsity masks applied while training

An engine imports the base of `runs` (config, data, gpu_loader, device, models, checkpoint,
store, results, refs, errors) and the other engines, never `runs.studies`. One exception,
inside a function: distill's k-NN probe of the student (`knn_of`) uses probes.features and
probes.nearest, which import only the base, so no import cycle can form. The analyses
(probes, landscape, tickets) may import an engine for engine work (SGD children, IMP levels).
"""
