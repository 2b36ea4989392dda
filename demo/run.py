"""``meditron-jax demo``: the whole mission on an embedded default, on 8 simulated devices.

1. build a tiny Llama-3.1-architecture model and write it as a Hugging Face snapshot
   (config.json, safetensors shards + index, tokenizer files, generation_config.json);
2. ``convert`` it to a native checkpoint;
3. continued-pretrain it on the bundled clinical corpus, then fine-tune it on the bundled
   Q&A pairs (loss on answers only), then align it with DPO on the bundled preference
   pairs (held-out reward margin and preference accuracy reported), sharded
   ``data=2,fsdp=2,tensor=2``;
4. ``generate`` answers to clinical prompts (sharded, streamed) and ``score`` a few
   multiple-choice items;
5. ``export`` back to a Hugging Face directory and, when transformers is installed,
   reload it there and compare logits;
6. print a summary table.

Each stage runs the real CLI command (printed as it runs), in this process.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from meditron_jax.errors import UserError

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "meditron_jax", "data")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="directory for every artifact")
    parser.add_argument("--devices", type=int, default=8,
                        help="simulated CPU devices (sets XLA_FLAGS before JAX starts)")
    parser.add_argument("--mesh", default="data=2,fsdp=2,tensor=2", help="training mesh")
    parser.add_argument("--infer-mesh", default="data=4,tensor=2", help="inference mesh")
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--quick", action="store_true",
                        help="a shortened run (few steps) that still exercises every stage")
    parser.add_argument("--keep", action="store_true",
                        help="keep an existing --out directory (default: start afresh)")


def _set_devices(n: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _cli(*argv: str) -> None:
    from cli.main import main
    print(f"\n$ meditron-jax {' '.join(argv)}", flush=True)
    code = main(list(argv))
    if code:
        raise UserError(f"demo stage failed: meditron-jax {argv[0]} exited {code}")


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def build_snapshot(out: str, seed: int = 0) -> str:
    """Stage 1: a random tiny model + a BPE tokenizer learned from the bundled corpus,
    written exactly as a hub snapshot looks."""
    import jax

    from meditron_jax.io import checkpoint
    from meditron_jax.model.config import preset
    from meditron_jax.io.convert import export_to_hf
    from meditron_jax.model import init_params
    from meditron_jax.tokenizer import Tokenizer
    from train.bpe import train_bpe

    work = os.path.join(out, "_build")
    shutil.rmtree(work, ignore_errors=True)
    tok_dir = os.path.join(work, "tokenizer")
    with open(os.path.join(DATA, "clinical_corpus.txt"), encoding="utf-8") as f:
        corpus = [d.strip() for d in f.read().split("\n---\n") if d.strip()]
    with open(os.path.join(DATA, "clinical_qa.jsonl"), encoding="utf-8") as f:
        qa = [json.loads(line) for line in f if line.strip()]
    train_bpe(corpus + [r["prompt"] + r["completion"] for r in qa], 512, tok_dir)
    tok = Tokenizer.from_dir(tok_dir)
    cfg = preset("tiny").replace(bos_token_id=tok.bos_id, eos_token_id=tuple(tok.eos_ids))
    params = jax.device_get(init_params(cfg, jax.random.key(seed)))
    native = os.path.join(work, "native")
    checkpoint.save_params(native, cfg, params, source_dir=tok_dir)
    snapshot = os.path.join(out, "hf_snapshot")
    export_to_hf(native, snapshot, max_shard_size="300KB", overwrite=True, quiet=True)
    shutil.rmtree(work, ignore_errors=True)
    files = sorted(os.listdir(snapshot))
    print(f"wrote {snapshot}: {', '.join(files)}")
    return snapshot


def mc_items(n: int) -> list[dict]:
    """Multiple-choice items from the bundled Q&A: the right answer and three others."""
    with open(os.path.join(DATA, "clinical_qa.jsonl"), encoding="utf-8") as f:
        qa = [json.loads(line) for line in f if line.strip()]
    items = []
    for i in range(n):
        j = (i * 37) % len(qa)
        options = [qa[j]["completion"]] + [qa[(j + k * 11) % len(qa)]["completion"]
                                           for k in (1, 2, 3)]
        items.append({"question": qa[j]["prompt"], "options": options, "answer": 0})
    return items


def score_items(model_dir: str, out: str, items: list[dict], mesh: str) -> float:
    path_in = os.path.join(out, "mc_score_input.jsonl")
    path_out = os.path.join(out, "mc_scores.jsonl")
    with open(path_in, "w", encoding="utf-8") as f:
        for i, item in enumerate(items):
            for k, option in enumerate(item["options"]):
                f.write(json.dumps({"id": f"q{i}-{k}", "context": item["question"],
                                    "continuation": option}) + "\n")
    if os.path.exists(path_out):
        os.remove(path_out)
    _cli("score", "--model", model_dir, "--input", path_in, "--out", path_out,
         "--mesh", mesh, "--batch-size", "8")
    with open(path_out, encoding="utf-8") as f:
        scores = {r["id"]: r["logprob"] for r in map(json.loads, f)}
    correct = 0
    for i, item in enumerate(items):
        best = max(range(len(item["options"])), key=lambda k: scores[f"q{i}-{k}"])
        correct += best == item["answer"]
    return correct / len(items)


def compare_with_transformers(native_dir: str, hf_dir: str) -> float | None:
    """Max-abs logit difference between our forward and transformers on the export."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers is not installed: skipping the reload check")
        return None
    import jax
    import numpy as np

    from meditron_jax.io.loading import load_model
    from meditron_jax.model import forward

    model = load_model(native_dir)
    tokens = np.asarray(model.tokenizer.encode(
        "Question: How is cholera dehydration treated?\nAnswer:"), np.int32)[None]
    ours = np.asarray(jax.jit(lambda p, t: forward(p, t, model.cfg)[0])(model.params, tokens))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    return float(np.abs(ours - ref).max())


def dpo_stage(out: str, sft: str, steps: int, common: list[str]) -> tuple[str, dict, list]:
    """DPO from the SFT model (its own frozen reference) on the bundled preference pairs;
    the held-out pairs' reward margin and accuracy at step 0 (policy = reference: both 0)
    and at each eval."""
    dpo = os.path.join(out, "dpo")
    pairs = os.path.join(DATA, "clinical_preferences.jsonl")
    held_out = os.path.join(DATA, "clinical_preferences_heldout.jsonl")
    every = max(steps // 2, 1)
    _cli("train", "--config", os.path.join(CONFIGS, "tiny_dpo.yaml"),
         "--set", f"output_dir={dpo}", "--set", f"model.init_from={sft}",
         "--set", f"data.train_files=[{pairs}]", "--set", f"data.eval_file={held_out}",
         "--set", f"train.steps={steps}", "--set", f"checkpoint.every={steps}",
         "--set", f"log.eval_every={every}", *common)
    with open(os.path.join(dpo, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    evals = [{"step": 0, "eval_reward_margin": 0.0, "eval_reward_accuracy": 0.0}]
    with open(summary["metrics"], encoding="utf-8") as f:
        evals += [r for r in map(json.loads, f) if "eval_reward_margin" in r]
    print("held-out preference pairs (the 27 of clinical_preferences_heldout.jsonl in 2 batches "
          "of 16, five twice; reward = beta * log-ratio to the SFT model):")
    for r in evals:
        print(f"  step {r['step']:>3}: reward margin {r['eval_reward_margin']:+.3f}, "
              f"preference accuracy {100 * r['eval_reward_accuracy']:.0f}%")
    return dpo, summary, evals


def run(args: argparse.Namespace) -> int:
    _set_devices(args.devices)
    started = time.time()
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.keep:
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    pre_steps, sft_steps = (30, 20) if args.quick else (args.pretrain_steps, args.sft_steps)
    dpo_steps = 12 if args.quick else args.dpo_steps
    timings: dict[str, float] = {}

    def stage(name):
        timings[name] = time.time()

    _banner("1/6 build a tiny Llama-3.1-architecture model as a Hugging Face snapshot")
    stage("build")
    snapshot = build_snapshot(out)

    _banner("2/6 convert the snapshot to a native checkpoint")
    stage("convert")
    native = os.path.join(out, "native")
    _cli("convert", "--model", snapshot, "--out", native)

    _banner(f"3/6 continued pretraining ({pre_steps} steps), then SFT ({sft_steps} steps) and "
            f"DPO ({dpo_steps} steps), mesh {args.mesh}")
    stage("train")
    pretrain, sft = os.path.join(out, "pretrain"), os.path.join(out, "sft")
    corpus, qa = os.path.join(DATA, "clinical_corpus.txt"), os.path.join(DATA, "clinical_qa.jsonl")
    common = ["--set", f"train.mesh={args.mesh}", "--set", "log.every=25"]
    _cli("train", "--config", os.path.join(CONFIGS, "tiny_pretrain.yaml"),
         "--set", f"output_dir={pretrain}", "--set", f"model.init_from={native}",
         "--set", "data.tokenizer=null", "--set", f"data.train_files=[{corpus}]",
         "--set", f"data.eval_file={corpus}", "--set", f"train.steps={pre_steps}",
         "--set", f"checkpoint.every={max(pre_steps // 2, 1)}",
         "--set", f"log.eval_every={max(pre_steps // 2, 1)}", *common)
    _cli("train", "--config", os.path.join(CONFIGS, "tiny_sft.yaml"),
         "--set", f"output_dir={sft}", "--set", f"model.init_from={pretrain}",
         "--set", f"data.train_files=[{qa}]", "--set", f"train.steps={sft_steps}",
         "--set", f"checkpoint.every={max(sft_steps // 2, 1)}", *common)
    with open(os.path.join(pretrain, "summary.json"), encoding="utf-8") as f:
        pre_summary = json.load(f)
    with open(os.path.join(sft, "summary.json"), encoding="utf-8") as f:
        sft_summary = json.load(f)
    dpo, dpo_summary, dpo_evals = dpo_stage(out, sft, dpo_steps, common)
    model_dir = os.path.join(sft, "model")

    _banner(f"4/6 generate (streamed, mesh {args.infer_mesh}) and score multiple-choice items")
    stage("generate")
    with open(os.path.join(DATA, "clinical_prompts.txt"), encoding="utf-8") as f:
        prompts = [p.strip() for p in f if p.strip()]
    _cli("generate", "--model", model_dir, "--prompt", prompts[0], "--max-new-tokens", "32",
         "--mesh", args.infer_mesh, "--batch-size", "4")
    prompts_file = os.path.join(out, "prompts.jsonl")
    with open(prompts_file, "w", encoding="utf-8") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": f"p{i}", "prompt": p}) + "\n")
    generations = os.path.join(out, "generations.jsonl")
    if os.path.exists(generations):
        os.remove(generations)
    _cli("generate", "--model", model_dir, "--prompts", prompts_file, "--out", generations,
         "--max-new-tokens", "32", "--mesh", args.infer_mesh, "--batch-size", "4")
    with open(generations, encoding="utf-8") as f:
        for r in map(json.loads, f):
            print(f"  [{r['id']}] {r['completion'][:100]!r} ({r['finish_reason']})")
    accuracy = score_items(model_dir, out, mc_items(8), args.infer_mesh)
    print(f"multiple-choice accuracy on 8 items (seen in SFT; chance 25%): {100 * accuracy:.0f}%")

    _banner("5/6 export to Hugging Face and reload in transformers")
    stage("export")
    exported = os.path.join(out, "hf_export")
    _cli("export", "--model", model_dir, "--out", exported, "--overwrite")
    diff = compare_with_transformers(model_dir, exported)
    if diff is not None:
        verdict = "match" if diff < 1e-4 else "MISMATCH"
        print(f"transformers logits vs ours: max-abs difference {diff:.2e} ({verdict})")
    stage("end")

    _banner("6/6 summary")
    names = list(timings)
    durations = {a: timings[b] - timings[a] for a, b in zip(names, names[1:])}
    rows = [
        ("HF snapshot", snapshot, f"{durations['build']:.0f}s"),
        ("native checkpoint", native, f"{durations['convert']:.0f}s"),
        ("pretraining", f"{pre_summary['steps']} steps, loss {pre_summary['final_loss']:.3f}, "
                        f"{pre_summary['tokens_per_s'] or 0:.0f} tok/s", pretrain),
        ("SFT", f"{sft_summary['steps']} steps, loss {sft_summary['final_loss']:.3f}, "
                f"{sft_summary['tokens_per_s'] or 0:.0f} tok/s", sft),
        ("DPO", f"{dpo_summary['steps']} steps, held-out margin "
                f"{dpo_evals[-1]['eval_reward_margin']:+.3f}, accuracy "
                f"{100 * dpo_evals[-1]['eval_reward_accuracy']:.0f}%", dpo),
        ("loss plots", os.path.join(pretrain, "loss.png"), os.path.join(sft, "loss.png")),
        ("generations", generations, f"{durations['generate']:.0f}s incl. scoring"),
        ("MC scores", os.path.join(out, "mc_scores.jsonl"), f"accuracy {100 * accuracy:.0f}%"),
        ("HF export", exported, "logits max-abs diff " + (f"{diff:.1e}" if diff is not None
                                                          else "not checked")),
    ]
    width = max(len(r[0]) for r in rows)
    for name, a, b in rows:
        print(f"  {name:<{width}}  {a}  |  {b}")
    print(f"demo finished in {time.time() - started:.0f}s; artifacts under {out}")
    summary = {"pretrain": pre_summary, "sft": sft_summary, "dpo": dpo_summary,
               "dpo_heldout": dpo_evals, "mc_accuracy": accuracy,
               "export_max_abs_diff": diff, "snapshot": snapshot, "native": native,
               "model": model_dir, "export": exported, "generations": generations,
               "seconds": time.time() - started}
    with open(os.path.join(out, "demo_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    sys.stdout.flush()
    return 0
