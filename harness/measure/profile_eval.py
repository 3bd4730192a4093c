"""``trilemma profile --eval``: the evaluation path's speed, side by side, in one process.

On the same uint8 images it times

    * this machine's convolution throughput: a channels-last 3x3 convolution of Inception's size
      (the ceiling any Inception implementation here can reach), in GFLOP/s;
    * feature extraction by trilemma's extractor (:mod:`trilemma.measure.inception`), its threads and
      batch chosen by timing;
    * the extractor trilemma used before (torch-fidelity's network, channels-last, one-channel images
      repeated to three before the resize, batch 25, torch's default threads), for the before/after ratio;
    * torch-fidelity's own ``calculate_metrics`` (FID of the images against themselves, no cache);

and checks the features against torch-fidelity's network, in fp32 and in float64. Each rate is images
per second after an untimed warm-up, the median of ``repeats`` rounds in which every pass (and the
ceiling) is timed once, so that ratios compare passes timed side by side; FLOPs per image are counted with
``torch.utils.flop_counter`` so a rate reads as a fraction of the convolution ceiling. On a GPU it also
times a FID-50k end to end (features of 50,000 images and the metric against 50,000 references).
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Any, Optional

import torch

from trilemma.measure import fid as fidlib
from trilemma.measure.inception import set_threads
from trilemma.measure.timing import load_average, synchronize


def conv_throughput(device: torch.device, threads: int, seconds: float = 3.0) -> float:
    """GFLOP/s of a channels-last 3x3 convolution (192 -> 192 channels on 35x35, Inception's Mixed_5 size)."""
    before = set_threads(threads)
    conv = torch.nn.Conv2d(192, 192, 3, padding=1, bias=False).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(8, 192, 35, 35, device=device).contiguous(memory_format=torch.channels_last)
    flops = 2 * 8 * 192 * 192 * 9 * 35 * 35
    with torch.inference_mode():
        conv(x)
        rates, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds or len(rates) < 3:
            synchronize(device)
            t0 = time.perf_counter()
            conv(x)
            synchronize(device)
            rates.append(flops / (time.perf_counter() - t0) / 1e9)
    set_threads(before)
    return statistics.median(rates)


def flops_per_image(net: torch.nn.Module, channels: int, size: int, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randint(0, 256, (1, channels, size, size), dtype=torch.uint8, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(x)
    return float(counter.get_total_flops())


class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def _seconds(fn, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def _interleaved(passes: dict[str, tuple[Any, int]], repeats: int, device: torch.device,
                 ceiling) -> dict[str, Any]:
    """Time every pass once a round, round after round, with the convolution ceiling measured in each
    round too: on a shared machine the speed drifts by tens of percent within minutes, and a ratio of
    passes timed minutes apart measures the drift. Each pass has an untimed warm-up first."""
    for fn, _ in passes.values():
        fn()
    rounds = []
    for _ in range(repeats):
        row = {name: n / _seconds(fn, device) for name, (fn, n) in passes.items()}
        row["ceiling"] = ceiling()
        rounds.append(row)
    return {"rounds": rounds,
            **{name: {"images_per_second": statistics.median(r[name] for r in rounds),
                      "spread": [min(r[name] for r in rounds), max(r[name] for r in rounds)],
                      "images": n} for name, (_, n) in passes.items()},
            "ceiling": statistics.median(r["ceiling"] for r in rounds)}


def _ratio(rounds: list[dict[str, float]], num: str, den: str) -> dict[str, Any]:
    ratios = [r[num] / r[den] for r in rounds]
    return {"median": statistics.median(ratios), "spread": [min(ratios), max(ratios)]}


def profile_eval(weights: Optional[str], device: torch.device, n: int = 100, repeats: int = 3,
                 channels: int = 1, size: int = 28, fid50k: Optional[bool] = None) -> dict[str, Any]:
    """The measurements described in the module docstring, as one record."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    load_before = load_average()

    ours = fidlib.FeatureExtractor(weights, device)
    reference = FeatureExtractorInceptionV3(fidlib.EXTRACTOR, [fidlib.FEATURE_LAYER],
                                            feature_extractor_weights_path=weights).eval().to(device)
    old = FeatureExtractorInceptionV3(fidlib.EXTRACTOR, [fidlib.FEATURE_LAYER],
                                      feature_extractor_weights_path=weights).eval().to(device)
    old = old.to(memory_format=torch.channels_last)
    threads = ours.threads

    def before():  # the harness's extraction until this change
        with torch.inference_mode():
            for chunk in images.split(25):
                old(chunk.expand(-1, 3, -1, -1).to(device))[0].float().cpu()

    def after():
        ours(iter([images]))

    def fidelity():
        import torch_fidelity

        torch_fidelity.calculate_metrics(input1=_Images(images.expand(-1, 3, -1, -1)),
                                         input2=_Images(images.expand(-1, 3, -1, -1)), fid=True,
                                         feature_extractor="inception-v3-compat",
                                         feature_extractor_weights_path=weights, cuda=device.type == "cuda",
                                         verbose=False, cache=False, batch_size=25, save_cpu_ram=True)

    # The previous extractor and torch-fidelity run with torch's default threads, as they did; ours
    # with the threads its calibration chose. The ceiling is measured with all of torch's threads.
    timed = _interleaved({"after": (after, n), "before": (before, n), "torch_fidelity": (fidelity, 2 * n)},
                         repeats, device, lambda: conv_throughput(device, torch.get_num_threads(), seconds=1.0))
    agreement = feature_agreement(ours, reference, images[:8], device)
    feature_error = agreement.pop("ours_vs_torch_fidelity")
    gflop = flops_per_image(ours.net, channels, size, device) / 1e9
    for row in timed["rounds"]:
        row["fraction_of_conv_ceiling"] = row["after"] * gflop / row["ceiling"]
    fraction = [row["fraction_of_conv_ceiling"] for row in timed["rounds"]]
    record = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"{os.cpu_count()} CPU cores", "threads": threads, "batch": ours.batch_size,
        "calibration": ours.calibration, "images": n, "image_shape": [channels, size, size],
        "repeats": repeats, "gflop_per_image": gflop, "conv_gflop_per_second": timed["ceiling"],
        "after": timed["after"], "before": timed["before"], "torch_fidelity": timed["torch_fidelity"],
        "rounds": timed["rounds"],
        "speedup_over_before": _ratio(timed["rounds"], "after", "before"),
        "speedup_over_torch_fidelity": _ratio(timed["rounds"], "after", "torch_fidelity"),
        "fraction_of_conv_ceiling": {"median": statistics.median(fraction), "spread": [min(fraction), max(fraction)]},
        "feature_max_relative_difference": feature_error,
        "feature_error_against_float64": agreement,
        "load_before": load_before, "load_after": load_average(),
        "torch": torch.__version__,
    }
    if fid50k if fid50k is not None else device.type == "cuda":
        record["fid50k_seconds"] = _fid50k(ours, device)
    return record


def feature_agreement(ours: fidlib.FeatureExtractor, reference: torch.nn.Module, images: torch.Tensor,
                      device: torch.device) -> dict[str, float]:
    """Max feature differences, relative to the largest feature: ours against torch-fidelity's network,
    and each of them against that network run in float64 (its input cast to float64 before the resize).

    The float64 figures say how far fp32 arithmetic itself moves the features, so that a difference
    between two fp32 implementations reads against it."""
    exact = copy.deepcopy(reference).double()
    exact.feature_extractor_internal_dtype = torch.float64  # torch-fidelity's own dtype switch
    three = images.expand(-1, 3, -1, -1).to(device)
    with torch.inference_mode():
        want = reference(three)[0].double()
        truth = exact(three)[0]
    got = ours(iter([images])).double()
    scale = truth.abs().max()
    return {"ours_vs_torch_fidelity": float((got - want).abs().max() / want.abs().max()),
            "ours_vs_float64": float((got - truth).abs().max() / scale),
            "torch_fidelity_vs_float64": float((want - truth).abs().max() / scale)}


def _fid50k(extractor: fidlib.FeatureExtractor, device: torch.device, n: int = 50_000) -> dict[str, float]:
    """Seconds of a FID-50k end to end on random 32x32 RGB images: 50k features and the metric."""
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    ref_features = torch.randn(n, 2048, device=device).abs()
    t0 = time.perf_counter()
    feats = extractor(iter(images.split(1000)))
    synchronize(device)
    t1 = time.perf_counter()
    fidlib.metrics_from_features(feats, ref_features, kid=True, prc=False)
    synchronize(device)
    return {"features": t1 - t0, "metrics": time.perf_counter() - t1, "total": time.perf_counter() - t0}


def render(record: dict[str, Any]) -> str:
    """The record as the few lines a person reads: medians over the rounds, [min, max] beside them."""
    def span(d, fmt):
        return f"{format(d['median' if 'median' in d else 'images_per_second'], fmt)} " \
               f"[{format(d['spread'][0], fmt)}, {format(d['spread'][1], fmt)}]"

    lines = [f"evaluation path on {record['device_name']} ({record['device']}), {record['images']} images "
             f"{'x'.join(map(str, record['image_shape']))}, threads {record['threads']}, batch {record['batch']}, "
             f"{record['repeats']} interleaved rounds, load {record['load_before']:.2f} -> {record['load_after']:.2f}",
             f"  convolution ceiling     {record['conv_gflop_per_second']:8.1f} GFLOP/s "
             f"(Inception: {record['gflop_per_image']:.2f} GFLOP/image)"]
    for key, label in (("after", "trilemma extractor"), ("before", "previous extractor"),
                       ("torch_fidelity", "torch-fidelity")):
        lines.append(f"  {label:<22}  {span(record[key], '8.2f')} images/s")
    at_ceiling = record["conv_gflop_per_second"] / record["gflop_per_image"]
    lines.append(f"  at the ceiling          {at_ceiling:8.2f} images/s = "
                 f"{at_ceiling / record['before']['images_per_second']:.2f} x the previous extractor "
                 f"(every convolution at the ceiling's rate)")
    lines += [f"  speed-up (median of the rounds' ratios): {span(record['speedup_over_before'], '.2f')} x the "
              f"previous extractor, {span(record['speedup_over_torch_fidelity'], '.2f')} x torch-fidelity's "
              f"calculate_metrics; {span(record['fraction_of_conv_ceiling'], '.0%')} of the convolution ceiling",
              f"  features: max difference {record['feature_max_relative_difference']:.1e} of their scale "
              f"against torch-fidelity's network"]
    exact = record.get("feature_error_against_float64")
    if exact:
        lines.append(f"  against that network in float64: ours {exact['ours_vs_float64']:.1e}, "
                     f"torch-fidelity's fp32 {exact['torch_fidelity_vs_float64']:.1e}")
    if "fid50k_seconds" in record:
        f = record["fid50k_seconds"]
        lines.append(f"  FID-50k end to end: {f['total']:.1f} s ({f['features']:.1f} s features, "
                     f"{f['metrics']:.1f} s metrics)")
    return "\n".join(lines)
