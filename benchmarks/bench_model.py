#!/usr/bin/env python
"""Performance table of P-MNER against the plain linear token classifier on the same encoder.

Measures, on this machine, with random inputs of fixed shape:
  1. training step time (forward + backward + AdamW step) of P-MNER (TCFM + verbalizer) over the baseline
     (same encoder, linear head, no visual input), at the same batch size and length;
  2. inference throughput (sequences per second) of both;
  3. peak resident memory of a training step (each configuration in a fresh process);
  4. the verbalizer head against a full-vocabulary MLM head (batch x length x vocab logits, then the label words);
  5. how step time grows with sequence length and with the number of objects.

    python benchmarks/bench_model.py                      # MiniLM-L6 (offline extra) on 2 CPU cores, ~5 min
    python benchmarks/bench_model.py --text-model bert-base-uncased --device cuda --batch-size 32

Prints a markdown table per section. Times are medians over --repeats steps after --warmup steps; sections 1-3
repeat each model in --rounds fresh processes (rotating order) and report the median over rounds for times and
the maximum over rounds for peak memory.
"""

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-model", default="offline-minilm", help="masked LM folder / Hub id, or offline-minilm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=64, help="sequence length of sections 1-4")
    parser.add_argument("--objects", type=int, default=5)
    parser.add_argument("--lengths", default="32,64,128", help="sequence lengths of section 5")
    parser.add_argument("--object-counts", default="0,1,3,5", help="object counts of section 5")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="fresh processes per configuration of sections 1-3, in rotating order; the median over rounds is reported",
    )
    return parser.parse_args()


def build_model(text_model, **switches):
    from modeling_pmner import PMNERForTokenClassification
    from train_pmner import resolve_text_model

    import transformers

    transformers.utils.logging.set_verbosity_error()
    return PMNERForTokenClassification.from_text_pretrained(resolve_text_model(text_model), **switches)


def make_batch(model, batch_size, length, objects, device, generator):
    vocab = model.config.text_config.vocab_size
    batch = {
        "input_ids": torch.randint(1000, vocab, (batch_size, length), generator=generator),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "labels": torch.randint(0, model.config.num_labels, (batch_size, length), generator=generator),
    }
    if model.config.use_visual and objects > 0:
        batch["visual_features"] = torch.randn(batch_size, objects, model.config.visual_feature_dim, generator=generator)
        batch["visual_mask"] = torch.ones(batch_size, objects, dtype=torch.bool)
    return {name: tensor.to(device) for name, tensor in batch.items()}


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step, warmup, repeats, device) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_time(model, batch, args):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    autocast = torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, args.warmup, args.repeats, args.device)


def inference_time(model, batch, args):
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    autocast = torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        with torch.inference_mode(), autocast:
            model(**inputs)

    return time_steps(step, args.warmup, args.repeats, args.device)


CONFIGURATIONS = {
    "baseline (linear head, text only)": dict(head="linear", use_visual=False),
    "P-MNER text only (verbalizer)": dict(head="verbalizer", use_visual=False),
    "P-MNER (TCFM + verbalizer)": dict(head="verbalizer", use_visual=True, fusion="tcfm"),
}


def measure_configuration(name, args, queue):
    """Runs in a fresh process so that its peak RSS belongs to this configuration alone."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model(args.text_model, **CONFIGURATIONS[name]).to(args.device)
    batch = make_batch(model, args.batch_size, args.length, args.objects, args.device, generator)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train = train_step_time(model, batch, args)
    infer = inference_time(model, batch, args)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    peak_cuda = torch.cuda.max_memory_allocated() if str(args.device).startswith("cuda") else None
    queue.put(
        {
            "name": name,
            "train": train,
            "infer": infer,
            "peak_rss_mib": peak_rss / 1024,
            "rss_before_mib": rss_before / 1024,
            "peak_cuda_mib": None if peak_cuda is None else peak_cuda / 2**20,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    )


def head_cost(args):
    """The verbalizer head against a full-vocabulary MLM head on the same fused features."""
    torch.manual_seed(0)
    model = build_model(args.text_model, head="verbalizer", use_visual=False).to(args.device).eval()
    head = model.verbalizer_head
    embeddings = model.get_input_embeddings()
    fused = torch.randn(args.batch_size, args.length, model.config.hidden_size, device=args.device)
    index = head.label_word_index if head.label_word_index is not None else None
    weight = head.label_word_weight

    def verbalizer():
        with torch.inference_mode():
            head(fused, embeddings)  # (B, L, labels)

    def full_vocabulary():
        with torch.inference_mode():
            states = head.LayerNorm(head.transform_act_fn(head.dense(fused)))
            vocab_logits = states @ embeddings.weight.T  # (B, L, vocab)
            (vocab_logits[..., index] * weight).sum(-1) + head.bias  # (B, L, labels)

    vocab = model.config.text_config.vocab_size
    return {
        "verbalizer": time_steps(verbalizer, args.warmup, args.repeats, args.device),
        "full": time_steps(full_vocabulary, args.warmup, args.repeats, args.device),
        "verbalizer_bytes": args.batch_size * args.length * model.config.num_labels * 4,
        "full_bytes": args.batch_size * args.length * vocab * 4,
    }


def scaling(args):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model(args.text_model, **CONFIGURATIONS["P-MNER (TCFM + verbalizer)"]).to(args.device)
    by_length = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        batch = make_batch(model, args.batch_size, length, args.objects, args.device, generator)
        by_length[length] = train_step_time(model, batch, args)
    by_objects = {}
    for objects in [int(x) for x in args.object_counts.split(",")]:
        batch = make_batch(model, args.batch_size, args.length, objects, args.device, generator)
        by_objects[objects] = train_step_time(model, batch, args)
    return by_length, by_objects


def main():
    args = parse_args()
    if args.rounds < 1 or args.repeats < 1:
        raise SystemExit(f"--rounds and --repeats must be at least 1, got {args.rounds} and {args.repeats}")
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"device {args.device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}, text model {args.text_model}, "
        f"batch {args.batch_size}, length {args.length}, objects {args.objects}, median of {args.repeats} after {args.warmup}"
    )
    context = multiprocessing.get_context("spawn")
    names = list(CONFIGURATIONS)
    rounds = {name: [] for name in names}
    for round_index in range(args.rounds):
        # rotate the order so that no configuration always runs first (warm caches, a busy neighbour)
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            queue = context.Queue()
            process = context.Process(target=measure_configuration, args=(name, args, queue))
            process.start()
            rounds[name].append(queue.get())
            process.join()
            if process.exitcode != 0:
                raise RuntimeError(f"measuring {name!r} failed with exit code {process.exitcode}")
    results = {}
    for name, runs in rounds.items():
        results[name] = dict(runs[0])
        results[name]["train"] = statistics.median(run["train"] for run in runs)
        results[name]["infer"] = statistics.median(run["infer"] for run in runs)
        results[name]["train_rounds"] = [run["train"] for run in runs]
        results[name]["peak_rss_mib"] = max(run["peak_rss_mib"] for run in runs)
        cuda = [run["peak_cuda_mib"] for run in runs if run["peak_cuda_mib"] is not None]
        results[name]["peak_cuda_mib"] = max(cuda) if cuda else None

    baseline = results["baseline (linear head, text only)"]
    print("\n## 1-3. Training step, inference, peak memory\n")
    print(f"Median over {args.rounds} fresh processes per model (each a median of {args.repeats} steps).\n")
    print(
        "| model | parameters | train step (s) | x baseline | train step per round (s) | inference (seq/s) "
        "| peak RSS (MiB) | peak CUDA (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        cuda = "-" if result["peak_cuda_mib"] is None else f"{result['peak_cuda_mib']:.0f}"
        print(
            f"| {name} | {result['parameters'] / 1e6:.1f} M | {result['train']:.3f} | {result['train'] / baseline['train']:.2f} "
            f"| {', '.join(f'{t:.3f}' for t in result['train_rounds'])} | {args.batch_size / result['infer']:.1f} | {result['peak_rss_mib']:.0f} | {cuda} |"
        )

    cost = head_cost(args)
    print("\n## 4. Verbalizer head against a full-vocabulary MLM head (inference, same fused features)\n")
    print("| head | time (ms) | logits tensor (MiB) |")
    print("|---|---|---|")
    print(f"| verbalizer (label words only) | {cost['verbalizer'] * 1e3:.2f} | {cost['verbalizer_bytes'] / 2**20:.2f} |")
    print(f"| full vocabulary, then label words | {cost['full'] * 1e3:.2f} | {cost['full_bytes'] / 2**20:.1f} |")

    by_length, by_objects = scaling(args)
    print("\n## 5. P-MNER training step time against sequence length and object count\n")
    print("| sequence length | train step (s) |")
    print("|---|---|")
    for length, seconds in by_length.items():
        print(f"| {length} | {seconds:.3f} |")
    print(f"\n| objects (length {args.length}) | train step (s) |")
    print("|---|---|")
    for objects, seconds in by_objects.items():
        print(f"| {objects} | {seconds:.3f} |")
    print("\n" + json.dumps({"results": results, "head_cost": cost, "by_length": by_length, "by_objects": by_objects}))


if __name__ == "__main__":
    main()
