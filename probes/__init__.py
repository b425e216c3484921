"""Probes of frozen embeddings, as Python functions on in-memory models and data.

    probes.embed(model, images, batch_size=512, embed=None, mean=None, std=None, device=None)
        -> (N, D) float32 embeddings of any nn.Module (a layer name or callable via `embed`)
    probes.knn(train_x, train_y, test_x, test_y, k=20, metric="l2")  -> accuracy in [0, 1]
    probes.linear(train_x, train_y, test_x, test_y, method="lbfgs", seed=0, num_classes=None)
        -> accuracy in [0, 1] ("lbfgs" logistic regression or the "paper"'s AdamW probe)
    probes.evaluate_model(models, train, test=None, probes=("knn", "linear"), ks=(20,),
                          seeds=(0, 1, 2), embed=None, batch_size=512, device="auto")
        -> xarray.Dataset laid out as `python -m probes.evaluate`'s HDF5 result

The modules below: `features` (embeddings, pixels, input checks), `nearest` (k-NN),
`logistic` (linear probes, standardisation), `api` (the functions above, and `fill_probes`,
the one code path of the API and the CLI), `evaluate` (the CLI).
"""

from probes.api import embed, evaluate_model, knn, linear

__all__ = ["embed", "evaluate_model", "knn", "linear"]
