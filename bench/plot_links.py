"""Table, cost-model check and plot of ``bench/bench_links.py`` records.

    python bench/plot_links.py bench/results/links.json --md bench/results/links.md --png bench/results/links.png

The cost model (``pytrain.cost.ddp.ddp_step`` per hook, as ``pytrain.cost.hooks`` uses it): per record (one
rate), compute = that job's no-communication step, link = that job's calibrated alpha/beta and host seconds per
byte (the ranks' CPU work per byte sent), compression ratio =
the hook's measured wire bytes / plain all-reduce's; codec seconds = what a hook's step
has beyond the model without codec, the median over the rates (on loopback and fast links that remainder is
mostly the codec's work; the median keeps one noisy job from setting it).  The
plot: step time against link rate, one colour per hook, measured points and the predicted curve (link of the
mean calibrated efficiency, alpha and host seconds per byte, compute of the first rated record's floor).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

from pytrain.cost.collectives import Link
from pytrain.cost.ddp import ddp_step
from pytrain.trainers.emulated_link import parse_rate


def _link(rec: dict) -> Link:
    return Link(rec["link"]["alpha_s"], rec["link"]["beta_s_per_byte"])


def predict(rec: dict, hook: str, codec_s: float) -> float:
    cases = rec["cases"]
    ratio = cases[hook]["wire_bytes_per_step"] / cases["plain"]["wire_bytes_per_step"]
    return ddp_step(rec["n_params"], compute_s=cases["none"]["median_s"], world_size=rec["world_size"],
                    link=_link(rec), compression_ratio=ratio, codec_s=codec_s,
                    host_s_per_byte=rec["link"].get("host_s_per_byte", 0.0)).step_s


def codecs(records: List[dict]) -> Dict[str, float]:
    """hook -> codec seconds per step: the median over the records (rates) of the step beyond the model's
    prediction without codec (the median keeps one noisy rate from setting it)."""
    hooks = [h for h in records[0]["cases"] if h not in ("none", "plain")]
    out = {"plain": 0.0}
    for h in hooks:
        out[h] = statistics.median(max(0.0, r["cases"][h]["median_s"] - predict(r, h, 0.0)) for r in records)
    return out


def codec_per_param(records: List[dict]) -> Dict[str, float]:
    """hook -> codec seconds per parameter per step, from ``codecs`` of each model's records (the median over models)."""
    fits = [{h: c / recs[0]["n_params"] for h, c in codecs(recs).items()}
            for recs in ([r for r in records if r["model"] == m] for m in sorted({r["model"] for r in records}))]
    return {h: statistics.median(f[h] for f in fits if h in f) for h in fits[0]}


def rows(records: List[dict], per_param: Dict[str, float] = None) -> List[dict]:
    """Table rows; codec seconds fitted on ``records`` themselves, or ``per_param`` x the model's parameters
    (codecs fitted on other records: an out-of-sample check of the model)."""
    out = []
    for model in sorted({r["model"] for r in records}):
        recs = [r for r in records if r["model"] == model]
        codec = codecs(recs) if per_param is None else {h: k * recs[0]["n_params"] for h, k in per_param.items()}
        for rec in recs:
            plain = rec["cases"]["plain"]["median_s"]
            for hook, c in rec["cases"].items():
                if hook == "none":
                    continue
                pred = predict(rec, hook, codec.get(hook, 0.0)) if hook in codec else float("nan")
                out.append(dict(model=model, world_size=rec["world_size"], rate=rec["rate"], hook=hook,
                                measured_s=c["median_s"],
                                min_s=c["min_s"], max_s=c["max_s"], vs_plain=c["median_s"] / plain,
                                predicted_s=pred, error=pred / c["median_s"] - 1, wire_mb=c["wire_bytes_per_step"] / 1e6,
                                codec_s=codec.get(hook, float("nan")), floor_s=rec["cases"]["none"]["median_s"]))
    return out


def markdown(records: List[dict], per_param: Dict[str, float] = None) -> str:
    lines = ["| model | ranks | link | hook | measured ms (min-max) | x plain | predicted ms | error | codec ms | wire MB/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows(records, per_param):
        lines.append(f"| {r['model']} | {r['world_size']} | {r['rate']} | {r['hook']} | {r['measured_s'] * 1e3:.0f} "
                     f"({r['min_s'] * 1e3:.0f}-{r['max_s'] * 1e3:.0f}) | {r['vs_plain']:.2f}x | "
                     f"{r['predicted_s'] * 1e3:.0f} | {r['error']:+.0%} | {r['codec_s'] * 1e3:.0f} | {r['wire_mb']:.2f} |")
    notes = []
    for rec in records:
        link = _link(rec) if "link" in rec else None
        if link is not None and rec["rate"] != "loopback":
            eff = 8 / link.beta / parse_rate(rec["rate"])
            notes.append(f"- {rec['model']} @ {rec['rate']}: calibrated {link} ({eff:.0%} of the nominal rate), "
                         f"no-communication floor {rec['cases']['none']['median_s'] * 1e3:.0f} ms, {rec.get('date', '')}")
        elif link is not None:
            notes.append(f"- {rec['model']} @ loopback: calibrated {link}, floor "
                         f"{rec['cases']['none']['median_s'] * 1e3:.0f} ms, {rec.get('date', '')}")
    return "\n".join(lines + [""] + notes)


def plot(records: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in rows(records) if r["rate"] != "loopback"]
    fig, ax = plt.subplots(figsize=(8, 5))
    rated = [r for r in records if r["rate"] != "loopback"]
    effs = [8 / _link(r).beta / parse_rate(r["rate"]) for r in rated]
    alpha = statistics.mean(_link(r).alpha for r in rated)
    eff = statistics.mean(effs)
    host = statistics.mean(r["link"].get("host_s_per_byte", 0.0) for r in rated)
    grid = [0.3e9 * (40 / 0.3) ** (i / 60) for i in range(61)]
    for i, hook in enumerate(sorted({r["hook"] for r in table})):
        pts = sorted((parse_rate(r["rate"]), r["measured_s"]) for r in table if r["hook"] == hook)
        colour = f"C{i % 10}"
        ax.plot([p[0] / 1e9 for p in pts], [p[1] for p in pts], "o", color=colour, label=f"{hook} measured")
        base = rated[0]
        fake = dict(base, link={"alpha_s": alpha, "beta_s_per_byte": 0.0, "host_s_per_byte": host})
        codec = codecs(records).get(hook, 0.0)
        curve = []
        for rate in grid:
            fake["link"]["beta_s_per_byte"] = 8 / (rate * eff)
            curve.append(predict(fake, hook, codec))
        ax.plot([g / 1e9 for g in grid], curve, "-", color=colour, alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate (Gbit/s, tbf on veth)")
    ax.set_ylabel("DDP step time (s)")
    ax.set_title(f"2 ranks, {records[0]['model']} params: measured (points) and cost model (lines)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records")
    ap.add_argument("--md", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--codec-from", default=None,
                    help="records to fit the codec seconds per parameter on (default: the records themselves)")
    args = ap.parse_args(argv)
    records = json.loads(Path(args.records).read_text())
    per_param = codec_per_param(json.loads(Path(args.codec_from).read_text())) if args.codec_from else None
    text = markdown(records, per_param)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    if args.png:
        plot(records, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
