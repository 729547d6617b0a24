"""The demo's report: one PNG (four panels) and a short markdown file, written into the output dir.

Panels: per-token |Δlogp| between the server's rollout logprobs and the trainer's recomputation for
the same requests with the plugin off and on; the reward per step; the push time per step; the
per-step parity values (train_rollout_logprob_abs_diff, max |ratio − 1|).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class StepRecord:
    step: int
    version: str  # the weight version that generated this step's rollouts
    reward_mean: float
    rewards: list[float]
    train_rollout_logprob_abs_diff: float
    max_abs_logprob_diff: float
    max_ratio_dev: float
    loss: float
    clip_frac: float
    push_version: str  # the version pushed after this step's update
    push_s: float
    push_bytes: int
    generate_s: float
    train_s: float


@dataclass(frozen=True)
class GapComparison:
    """|Δlogp| per token, server vs trainer, for the same requests on the same weights."""

    what: str  # which rollouts, which weights, how they were obtained (goes into the report as is)
    on: torch.Tensor  # flat float64, plugin on
    off: torch.Tensor | None  # flat float64, plugin off (None: not measured, see `what`)
    same_completions: float | None  # fraction of completions whose tokens are identical on / off


@dataclass(frozen=True)
class ReportInputs:
    mode: str  # "bf16" or "fp8"
    device: str
    config: dict
    steps: list[StepRecord]
    gap: GapComparison
    notes: list[str]  # plain statements for the reader (e.g. what FP8 does to parity)
    wall_s: float


def _stats(d: torch.Tensor) -> dict:
    if d.numel() == 0:
        return {"tokens": 0, "mean": 0.0, "max": 0.0, "differing": 0}
    return {
        "tokens": d.numel(),
        "mean": d.mean().item(),
        "max": d.max().item(),
        "differing": int((d > 0).sum()),
    }


def exact(x: float) -> str:
    """A parity value as printed: exactly ``0.0``, or its value in scientific notation."""
    return "0.0" if x == 0 else f"{x:.3e}"


def plot(inputs: ReportInputs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in inputs.steps]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    fig.suptitle(
        f"truepolicy demo: GRPO on the tiny Qwen3 ({inputs.mode} rollouts, {inputs.device}), "
        f"{len(steps)} step{'s' if len(steps) != 1 else ''}",
        fontsize=13,
    )

    ax = axes[0, 0]
    gap = inputs.gap
    on = _stats(gap.on)
    if gap.off is not None:
        off = _stats(gap.off)
        ax.plot(range(gap.off.numel()), gap.off.numpy(), ".", ms=3, color="tab:red",
                label=f"plugin off: mean {off['mean']:.2e}, max {off['max']:.2e}")  # fmt: skip
    label = (
        f"plugin on: all {on['tokens']} tokens exactly 0.0"
        if on["differing"] == 0
        else f"plugin on: mean {on['mean']:.2e}, max {on['max']:.2e}"
    )
    ax.plot(range(gap.on.numel()), gap.on.numpy(), ".", ms=3, color="tab:blue", label=label)
    ax.set_title("per-token |logp server − logp trainer|, step-0 rollouts", fontsize=10)
    ax.set_xlabel(f"token ({gap.on.numel()} completion tokens, rollout order)")
    ax.set_ylabel("|Δlogp| (nats)")
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[0, 1]
    for r in inputs.steps:
        ax.plot([r.step] * len(r.rewards), r.rewards, ".", color="tab:green", alpha=0.15, ms=6)
    ax.plot(steps, [r.reward_mean for r in inputs.steps], "o-", color="tab:green", label="mean reward")
    modulus = inputs.config["target_modulus"]
    ax.set_title(f"reward: fraction of completion tokens with id % {modulus} == 0 (dots: completions)",
                 fontsize=10)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[1, 0]
    ax.bar(steps, [r.push_s for r in inputs.steps], color="tab:purple")
    mb = inputs.steps[0].push_bytes / 1e6 if inputs.steps else 0.0
    ax.set_title(f"weight push after each step (trainer → sidecar → SGLang, {mb:.1f} MB)\n"
                 "step 0 includes creating the trainer-sidecar process group", fontsize=10)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("push time (s)")

    ax = axes[1, 1]
    diffs = [r.train_rollout_logprob_abs_diff for r in inputs.steps]
    ratios = [r.max_ratio_dev for r in inputs.steps]
    ax.plot(steps, diffs, "o-", ms=9, label="train_rollout_logprob_abs_diff (mean |Δlogp|)")
    ax.plot(steps, ratios, "s--", ms=5, label="max |ratio − 1| at the rollout step")
    top = max(diffs + ratios)
    if gap.off is not None:
        off_mean = _stats(gap.off)["mean"]
        ax.axhline(off_mean, color="tab:red", ls=":", label="plugin off, step 0: mean |Δlogp|")
        top = max(top, off_mean)
    top = top * 1.3 or 1.0
    ax.set_ylim(-0.04 * top, top)
    exact_steps = sum(d == 0.0 and q == 0.0 for d, q in zip(diffs, ratios, strict=True))
    ax.set_title(f"on-policy parity per step: both exactly 0.0 at {exact_steps} of {len(steps)} steps",
                 fontsize=10)  # fmt: skip
    ax.set_xlabel("step")
    ax.legend(loc="upper left", fontsize=8)
    for ax in (axes[0, 1], axes[1, 0], axes[1, 1]):  # the per-step panels: whole steps on the x axis
        ax.set_xticks(steps[:: max(1, len(steps) // 12)])
        ax.set_xlim(-0.6, len(steps) - 0.4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(inputs: ReportInputs, png_name: str) -> str:
    gap = inputs.gap
    on = _stats(gap.on)
    lines = [
        "# truepolicy demo report",
        "",
        f"GRPO on the tiny random Qwen3, {len(inputs.steps)} steps, {inputs.mode} rollouts on "
        f"{inputs.device}; wall time {inputs.wall_s:.0f} s.",
        "",
        f"![plots]({png_name})",
        "",
        *[f"- {n}" for n in inputs.notes],
        "",
        "## Per step",
        "",
        "| step | rollout version | reward | train_rollout_logprob_abs_diff | max abs diff | "
        "max abs(ratio-1) | push (s) | generate (s) | train (s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in inputs.steps:
        lines.append(
            f"| {r.step} | {r.version} | {r.reward_mean:.3f} | {exact(r.train_rollout_logprob_abs_diff)} | "
            f"{exact(r.max_abs_logprob_diff)} | {exact(r.max_ratio_dev)} | {r.push_s:.3f} | "
            f"{r.generate_s:.1f} | {r.train_s:.1f} |"
        )
    lines += ["", "## Plugin off vs on (per-token |Δlogp|, server vs trainer)", "", gap.what, ""]
    lines += ["| | tokens | differing | mean | max |", "|---|---:|---:|---:|---:|"]
    if gap.off is not None:
        off = _stats(gap.off)
        lines.append(
            f"| plugin off | {off['tokens']} | {off['differing']} | {off['mean']:.3e} | {off['max']:.3e} |"
        )
    lines.append(
        f"| plugin on | {on['tokens']} | {on['differing']} | {exact(on['mean'])} | {exact(on['max'])} |"
    )
    if gap.same_completions is not None:
        lines += ["", f"Completions identical with the plugin off and on: {gap.same_completions:.0%}."]
    lines += ["", "## Configuration", "", "```json", json.dumps(inputs.config, indent=1), "```", ""]
    return "\n".join(lines)


def write_report(inputs: ReportInputs, out_dir: Path) -> dict[str, Path]:
    """Write ``report.png``, ``report.md`` and ``metrics.json`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"png": out_dir / "report.png", "md": out_dir / "report.md", "json": out_dir / "metrics.json"}
    plot(inputs, paths["png"])
    paths["md"].write_text(markdown(inputs, paths["png"].name))
    metrics = {
        "mode": inputs.mode,
        "device": inputs.device,
        "wall_s": inputs.wall_s,
        "config": inputs.config,
        "steps": [asdict(r) for r in inputs.steps],
        "gap": {
            "what": inputs.gap.what,
            "on": _stats(inputs.gap.on),
            "off": _stats(inputs.gap.off) if inputs.gap.off is not None else None,
            "same_completions": inputs.gap.same_completions,
        },
        "notes": inputs.notes,
    }
    paths["json"].write_text(json.dumps(metrics, indent=1))
    return paths
