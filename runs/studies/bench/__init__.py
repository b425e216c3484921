"""Benchmark of the hot paths: `python -m runs.bench [--device auto] [--quick] [--out bench]`.

For each hot path, in one process, the toolkit's fast path and a plain reference written here
the way public research code works: a torch.utils.data.DataLoader over a Dataset of PIL images
with torchvision transforms and worker processes, eager fp32, channels-first, one model or one
point at a time. Both compute the same thing (tests/test_bench.py checks it with augmentation
off and a fixed order); only their speed differs.

Per path: items per second (images, points, queries), seconds per step, achieved GFLOP/s,
model-FLOP utilisation (MFU) against the device's dense bf16 peak, and the ratio to the
reference. FLOPs per item are counted, not estimated: torch.utils.flop_counter.FlopCounterMode
over one forward + backward (forward only for inference) of the same network on the CPU, so
the backward is what autograd really runs, not a 3x rule; a ViT's attention matmuls count
(scaled_dot_product_attention runs on its math backend while counting). MFU is n/a on CPUs and
on GPUs missing from PEAK_BF16_TFLOPS (give --peak-tflops).

The train and distill sections also time the fast path alone for each variant network
(BenchConfig.variants, --variants: vit_tiny, vit_small, vgg11_bn, resnet18:norm=group by
default): MFU per architecture, recorded as `train_step[NAME options]` without a reference,
so no speed-up goal judges them.

Sections (SECTIONS, --sections; all by default): train, distill, eval, probes, landscape,
tickets, curvature (Hessian-vector products per second, forward-over-reverse against double
backward, and the time of the top-5 eigenvalues on 10k images), connectivity (weight matching
of two networks on the CPU and activation matching, in seconds; a trained curve's bend step
in images/s beside an ordinary supervised step), parallel (K runs of one shape trained
together as stacked parameters against the same runs in turn: runs/hour for K = 1..16,
runs.engines.parallel). A section whose package
cannot be imported is recorded as skipped; one that fails is recorded with its error and the
others still run. The JSON goes to `<out>/<device-slug>[-quick].json`, merged with the
sections already there. `--scaling` measures cost curves instead (scaling, scaling_plot:
time and peak memory of each hot path as its work grows, `<out>/scaling-<device-slug>.png`).

Modules: common (BenchConfig and its FULL/QUICK sizes, Bench, device facts, Runner, measure,
comparison, synthetic data and both loaders), one module per group of sections (training:
train, distill, eval; probes; landscape; tickets; curvature; connectivity; parallel), report (the
section registry, provenance, the JSON, goals, tables) and cli (`main`; `python -m
runs.bench` is its door).
"""
