"""Beyond this CPU: ``plan``'s ahead-of-time numbers for meditron3-8b on real targets.

Per-device memory and FLOPs per step of the real train step and decode loop, compiled
from abstract inputs only (nothing allocated, no accelerator needed), plus the model
FLOPs per token behind every MFU figure, so a user can hold them against published
MFU tables before renting hardware. A target the toolchain cannot compile for here
(TPU without libtpu) is reported as unavailable, with the reason.
"""
from __future__ import annotations

from meditron_jax.errors import UserError

MODEL = "meditron3-8b"
TARGETS = ("tpu:v5p:2x2x1", "tpu:v6e:2x4", "cpu:8")
BATCH, SEQ = 8, 2048


def measure() -> dict:
    """Runs inside a worker with 8 CPU devices (set before JAX starts)."""
    from cli.plan import load_config, make_plan

    cfg = load_config(MODEL)
    out: dict = {
        "model": MODEL, "batch": BATCH, "seq": SEQ,
        "model_flops_per_token": {"train": cfg.flops_per_token(SEQ, training=True),
                                  "forward": cfg.flops_per_token(SEQ, training=False)},
        "plans": [],
    }
    for target in TARGETS:
        for mode in ("train", "infer"):
            entry = {"target": target, "mode": mode}
            try:
                plan = make_plan(cfg, model=MODEL, mode=mode, target=target, mesh=None,
                                 batch=BATCH, seq=SEQ)
            except UserError as exc:
                entry["unavailable"] = str(exc)
            except Exception as exc:  # a planner bug must not lose the measured tables
                entry["unavailable"] = f"plan failed: {type(exc).__name__}: {exc}"
            else:
                entry.update(plan.to_json(), text=plan.format())
            out["plans"].append(entry)
    return out


def summary(section: dict) -> str:
    if "failed" in section:
        return f"beyond this CPU: the plan worker failed: {section['failed']}"
    per_token = section["model_flops_per_token"]
    lines = [f"beyond this CPU: {section['model']}, batch {section['batch']} x "
             f"{section['seq']} (plan: ahead-of-time, abstract inputs)",
             f"  model FLOPs per token used for MFU: train {per_token['train']:.3e}, "
             f"forward {per_token['forward']:.3e}"]
    for entry in section["plans"]:
        if "unavailable" in entry:
            lines.append(f"  {entry['target']} {entry['mode']}: unavailable: {entry['unavailable']}")
        else:
            lines.append(entry["text"])
    return "\n".join(lines)
