#!/usr/bin/env python
"""Inference speed of P-MNER on this machine: tweets per second, per-tweet latency and peak memory.

Rows (each measured in a fresh process, so that its peak memory is its own):
  encoder            the bare text encoder's forward (AutoModel), on the very batches P-MNER gets
  pmner-text-model   P-MNER forward, a text-only model (use_visual=False): text self-attention and prompt head
  pmner-no-image     P-MNER forward, the multimodal model on tweets without image (all-false visual mask)
  pmner-features     P-MNER forward, the multimodal model with precomputed FRR features (--objects per tweet)
  pipeline-no-image  the `multimodal-ner` pipeline end to end, raw text in, entities out (word splitting,
                     prompt encoding, windows, forward, aggregation), no image
  pipeline-features  the same with precomputed FRR features per tweet
Throughput: batches of --batch-size tweets. Latency: one tweet per call, p50 and p95 over --latency-tweets tweets.
`x encoder` is the row's time per tweet over the encoder's (batched): the cost of fusion, head and pipeline as a
ratio. FRR feature extraction itself (Faster R-CNN + ResNet-152) is not included: see benchmarks/bench_frr.py.

    python benchmarks/bench_inference.py                       # MiniLM-L6 (offline extra), Twitter-2017 test tweets
    python benchmarks/bench_inference.py --text-model bert-base-uncased --device cuda --num-tweets 2000

Tweets come from --data (default ../shared/data/twitter2017/test.txt beside the repository), else are synthetic.
Weights are random where the checkpoint has none (fusion, head): speed does not depend on them.

--compare-transformers measures instead, in one process and interleaved (--rounds passes, the order of the
contestants rotated each round, median reported), every tweet of --data, raw text in and entities out, batches of
--batch-size:
  transformers       transformers' own `token-classification` pipeline (aggregation "simple") on a
                     BertForTokenClassification with the P-MNER model's encoder weights and a 9-label head
  pmner              the `multimodal-ner` pipeline on the text-only P-MNER model (--model, else built on --text-model)
  pmner-int8         the same with quantize="int8" (int8 feed-forward layers of the encoder)
With --model (a trained folder) and a CoNLL --data, it also tags the file's words with and without int8 and scores
both against the gold tags (entity micro F1, training_pmner.seqeval_metric).

    python benchmarks/bench_inference.py --compare-transformers --model outputs/speed-model
"""

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT)
DEFAULT_DATA = os.path.join(PROJECT, "..", "shared", "data", "twitter2017", "test.txt")
ROWS = ("encoder", "pmner-text-model", "pmner-no-image", "pmner-features", "pipeline-no-image", "pipeline-features")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-model", default="offline-minilm", help="masked LM folder / Hub id, or offline-minilm")
    parser.add_argument("--data", default=DEFAULT_DATA, help="CoNLL file of tweets (synthetic tweets if missing)")
    parser.add_argument("--num-tweets", type=int, default=256, help="tweets of the throughput pass")
    parser.add_argument("--latency-tweets", type=int, default=64, help="tweets timed one by one")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--objects", type=int, default=5, help="objects per tweet in the precomputed features")
    parser.add_argument("--feature-dim", type=int, default=2048, help="FRR feature width (ResNet-152: 2048)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads per row (default 1: on a small machine shared with other jobs, more threads than "
        "free cores make OpenMP spin and times jump 10x; 0 keeps torch's default)",
    )
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ", ".join(ROWS))
    parser.add_argument(
        "--compare-transformers", action="store_true",
        help="P-MNER's pipeline (fp32 and int8) against transformers' token-classification pipeline, interleaved",
    )
    parser.add_argument("--rounds", type=int, default=3, help="--compare-transformers: interleaved passes")
    parser.add_argument("--model", default=None, help="--compare-transformers: a trained text-only P-MNER folder")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def read_tweets(path: str, count: int) -> tuple[list[list[str]], str]:
    """`count` tweets (lists of words) from a CoNLL file, cycled if it has fewer; synthetic if it is missing."""
    from training_pmner.twitter_mner import TwitterMNERConfig, read_twitter_conll

    tweets = []
    if path and os.path.isfile(path):
        tags = {tag for name in ("twitter2015", "twitter2017") for tag in TwitterMNERConfig(name=name).source_tags}
        tweets = [tweet.tokens for tweet in read_twitter_conll(path, sorted(tags)) if tweet.tokens]
        source = f"{os.path.normpath(path)} ({len(tweets)} tweets)"
    if not tweets:
        import random

        rng = random.Random(0)
        vocabulary = "RT @ # : ! the new festival Kawhi Leonard wins fan vote London Paris NBA Trump visits 😂".split()
        tweets = [[rng.choice(vocabulary) for _ in range(rng.randint(8, 30))] for _ in range(count)]
        source = "synthetic tweets"
    return [tweets[index % len(tweets)] for index in range(count)], source


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS now, VmHWM peak) in MiB. Unlike getrusage's ru_maxrss, which
    Linux carries over from the parent across fork + exec, VmHWM is this process's own peak."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best available


def current_rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    return _status_mib("VmHWM")


def build_folders(text_model: str, workdir: str, args) -> dict:
    """A multimodal and a text-only P-MNER folder (model + processor) on the text model."""
    import transformers
    from transformers import AutoTokenizer

    from modeling_pmner import PMNERForTokenClassification
    from processing_pmner import PMNERImageProcessor, PMNERProcessor
    from processing_pmner.pipeline_pmner import add_pipeline_to_folder

    transformers.utils.logging.set_verbosity_error()
    folders = {}
    for name, use_visual in (("multimodal", True), ("text-only", False)):
        model = PMNERForTokenClassification.from_text_pretrained(
            text_model, use_visual=use_visual, visual_feature_dim=args.feature_dim, max_objects=args.objects
        )
        image_processor = PMNERImageProcessor(max_objects=args.objects)  # settings only: features are precomputed
        labels = [model.config.id2label[index] for index in range(model.config.num_labels)]
        processor = PMNERProcessor(
            image_processor, AutoTokenizer.from_pretrained(text_model), label_names=labels, max_length=args.max_length
        )
        folder = os.path.join(workdir, name)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        add_pipeline_to_folder(folder)
        folders[name] = folder
    return folders


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_worker(spec: dict) -> dict:
    """Measures one row; runs in its own process."""
    import torch
    import transformers
    from transformers import AutoModel

    import modeling_pmner  # noqa: F401
    import processing_pmner  # noqa: F401
    from modeling_pmner import PMNERForTokenClassification
    from processing_pmner import PMNERProcessor
    from processing_pmner.pipeline_pmner import PMNERPipeline

    transformers.utils.logging.set_verbosity_error()
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    row, device = spec["row"], torch.device(spec["device"])
    baseline_rss = current_rss_mib()
    tweets, _ = read_tweets(spec["data"], spec["num_tweets"])
    latency_tweets = tweets[: spec["latency_tweets"]]
    batch_size = spec["batch_size"]
    folder = spec["folders"]["text-only" if row == "pmner-text-model" else "multimodal"]
    processor = PMNERProcessor.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(len(tweets), spec["objects"], spec["feature_dim"], generator=generator)  # (N, M, D)
    with_features = row.endswith("features")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if row.startswith("pipeline"):
        model = PMNERForTokenClassification.from_pretrained(folder).to(device).eval()
        pipe = PMNERPipeline(model=model, processor=processor, device=device)

        def items(start, stop):
            if with_features:
                return [
                    {"text": " ".join(tweets[index]), "visual_features": features[index]} for index in range(start, stop)
                ]
            return [" ".join(tweets[index]) for index in range(start, stop)]

        def run_batch(start, stop):
            pipe(items(start, stop), batch_size=stop - start)

        def run_one(index):
            pipe(items(index, index + 1)[0])

    else:
        if row == "encoder":
            model = AutoModel.from_pretrained(spec["text_model"]).to(device).eval()
        else:
            model = PMNERForTokenClassification.from_pretrained(folder).to(device).eval()
        names = ["input_ids", "attention_mask", "token_type_ids"]
        if with_features or row == "pmner-no-image":
            names += ["visual_features", "visual_mask"]

        def encode(start, stop):
            visual = {"visual_features": features[start:stop]} if with_features else {}
            encoding = processor(tweets[start:stop], return_tensors="pt", **visual)
            return {name: encoding[name].to(device) for name in names if name in encoding}

        batches = {start: encode(start, min(start + batch_size, len(tweets))) for start in range(0, len(tweets), batch_size)}
        singles = {index: encode(index, index + 1) for index in range(len(latency_tweets))}

        @torch.inference_mode()
        def run_batch(start, stop):
            model(**batches[start])

        @torch.inference_mode()
        def run_one(index):
            model(**singles[index])

    # warm-up (one batch, a few singles), then one timed pass of each kind
    run_batch(0, min(batch_size, len(tweets)))
    for index in range(min(3, len(latency_tweets))):
        run_one(index)
    sync()
    start_time = time.perf_counter()
    for start in range(0, len(tweets), batch_size):
        run_batch(start, min(start + batch_size, len(tweets)))
    sync()
    batched_seconds = time.perf_counter() - start_time
    latencies = []
    for index in range(len(latency_tweets)):
        begin = time.perf_counter()
        run_one(index)
        sync()
        latencies.append(time.perf_counter() - begin)
    result = {
        "row": row,
        "tweets_per_second": len(tweets) / batched_seconds,
        "batched_ms_per_tweet": 1000 * batched_seconds / len(tweets),
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p95_ms": 1000 * percentile(latencies, 0.95),
        "peak_rss_mib": peak_rss_mib(),
        "rss_over_imports_mib": peak_rss_mib() - baseline_rss,
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def build_contestants(args, text_model: str) -> tuple[dict, object, object]:
    """The three pipelines of --compare-transformers, and the fp32 / int8 P-MNER pipelines (for F1)."""
    import torch
    import transformers
    from transformers import AutoTokenizer, BertForTokenClassification

    from modeling_pmner import PMNERForTokenClassification
    from processing_pmner import PMNERImageProcessor, PMNERProcessor
    from processing_pmner.pipeline_pmner import PMNERPipeline

    transformers.utils.logging.set_verbosity_error()
    if args.model:
        model = PMNERForTokenClassification.from_pretrained(args.model).eval()
        processor = PMNERProcessor.from_pretrained(args.model)
    else:
        model = PMNERForTokenClassification.from_text_pretrained(text_model, use_visual=False).eval()
        labels = [model.config.id2label[index] for index in range(model.config.num_labels)]
        processor = PMNERProcessor(
            PMNERImageProcessor(max_objects=args.objects), AutoTokenizer.from_pretrained(text_model),
            label_names=labels, max_length=args.max_length,
        )
    encoder = model.pmner.text_model
    config = copy.deepcopy(encoder.config)
    config.num_labels = model.config.num_labels  # 9: B/I of four types and O
    config.id2label, config.label2id = dict(model.config.id2label), dict(model.config.label2id)
    torch.manual_seed(0)
    reference = BertForTokenClassification(config)
    missing, unexpected = reference.bert.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise RuntimeError(f"the encoder's weights do not fit BertModel: missing {missing}, unexpected {unexpected}")
    reference.eval()
    theirs = transformers.pipeline(
        "token-classification", model=reference, tokenizer=processor.tokenizer, device=args.device,
        aggregation_strategy="simple",
    )
    ours = PMNERPipeline(model=model, processor=processor, device=args.device)
    ours_int8 = PMNERPipeline(model=model, processor=processor, device=args.device, quantize="int8")
    return {"transformers": theirs, "pmner": ours, "pmner-int8": ours_int8}, ours, ours_int8


def compare_transformers(args, text_model: str):
    """--compare-transformers: tweets/s of the three pipelines, interleaved, and the int8 F1 difference."""
    import torch

    from training_pmner.seqeval_metric import compute_ner_scores
    from training_pmner.twitter_mner import TwitterMNERConfig, read_twitter_conll

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not os.path.isfile(args.data):
        raise SystemExit(f"--data {args.data} does not exist: --compare-transformers needs the CoNLL file")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    tags = sorted({tag for name in ("twitter2015", "twitter2017") for tag in TwitterMNERConfig(name=name).source_tags})
    parsed = [tweet for tweet in read_twitter_conll(args.data, tags) if tweet.tokens]
    texts = [" ".join(tweet.tokens) for tweet in parsed]
    started = time.perf_counter()
    contestants, ours, ours_int8 = build_contestants(args, text_model)
    names = list(contestants)
    for name in names:  # warm-up
        contestants[name](texts[: 2 * args.batch_size], batch_size=args.batch_size)
    times = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            begin = time.perf_counter()
            contestants[name](texts, batch_size=args.batch_size)
            times[name].append(time.perf_counter() - begin)
            print(f"  round {round_index + 1}: {name} {len(texts) / times[name][-1]:.1f} tweets/s", file=sys.stderr)
    speed = {name: len(texts) / statistics.median(times[name]) for name in names}

    print(f"\n### P-MNER pipeline against transformers' token-classification pipeline, on {args.device}\n")
    print(
        f"{cpu_name()}, {os.cpu_count()} CPUs visible, torch {torch.__version__} with {torch.get_num_threads()} "
        f"thread(s); all {len(texts)} tweets of {os.path.normpath(args.data)}, raw text in, entities out; batch size "
        f"{args.batch_size}; median of {args.rounds} interleaved passes; encoder "
        f"{os.path.basename(os.path.normpath(text_model))}{f', P-MNER model {args.model}' if args.model else ''}.\n"
    )
    print("| pipeline | tweets/s (median) | passes (tweets/s) | x transformers | x pmner |")
    print("|---|---|---|---|---|")
    for name in names:
        passes = ", ".join(f"{len(texts) / seconds:.1f}" for seconds in times[name])
        print(
            f"| {name} | {speed[name]:.1f} | {passes} | {speed[name] / speed['transformers']:.2f} | "
            f"{speed[name] / speed['pmner']:.2f} |"
        )
    if args.model:
        gold = [tweet.tags for tweet in parsed]
        inputs = [{"words": tweet.tokens} for tweet in parsed]
        print("\n| model | entity micro F1 (test) | precision | recall |")
        print("|---|---|---|---|")
        f1 = {}
        for name, pipe in (("pmner", ours), ("pmner-int8", ours_int8)):
            results = pipe(inputs, batch_size=args.batch_size, return_words=True, output_scheme="BIO")
            predicted = [[word["tag"] for word in result["words"]] for result in results]
            scores = compute_ner_scores(predicted, gold)
            f1[name] = 100 * scores["overall_f1"]
            print(
                f"| {name} | {f1[name]:.2f} | {100 * scores['overall_precision']:.2f} | "
                f"{100 * scores['overall_recall']:.2f} |"
            )
        print(f"\nint8 F1 difference: {f1['pmner-int8'] - f1['pmner']:+.2f} points")
    command = " ".join(["python", os.path.relpath(os.path.abspath(__file__), os.getcwd())] + sys.argv[1:])
    print(f"\nCommand: `{command}` ({time.perf_counter() - started:.0f} s in all)")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))))
        return
    if args.compare_transformers:
        from train_pmner import resolve_text_model

        return compare_transformers(args, resolve_text_model(args.text_model))
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.num_tweets < 1 or args.latency_tweets < 1 or args.batch_size < 1:
        raise SystemExit("--num-tweets, --latency-tweets and --batch-size must be at least 1")
    import torch

    from train_pmner import resolve_text_model

    text_model = resolve_text_model(args.text_model)
    _, source = read_tweets(args.data, args.num_tweets)
    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="pmner-bench-")
    try:
        folders = build_folders(text_model, workdir, args)
        results = {}
        for row in rows:
            spec = {
                "row": row, "device": args.device, "data": args.data, "num_tweets": args.num_tweets,
                "latency_tweets": min(args.latency_tweets, args.num_tweets), "batch_size": args.batch_size,
                "objects": args.objects, "feature_dim": args.feature_dim, "folders": folders,
                "text_model": text_model, "threads": args.threads,
            }
            completed = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
            )
            if completed.returncode != 0 or "RESULT " not in completed.stdout:
                raise RuntimeError(f"row {row} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
            results[row] = json.loads(completed.stdout.split("RESULT ", 1)[1])
            print(f"  measured {row}: {results[row]['tweets_per_second']:.1f} tweets/s", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    reference = results.get("encoder", {}).get("batched_ms_per_tweet")
    gpu = any("peak_gpu_mib" in result for result in results.values())
    print(f"\n### P-MNER inference, {os.path.basename(os.path.normpath(text_model))} on {args.device}\n")
    print(
        f"{cpu_name()}, {os.cpu_count()} CPUs visible, torch {torch.__version__} with "
        f"{args.threads if args.threads > 0 else torch.get_num_threads()} thread(s); {args.num_tweets} tweets from {source}; batch size {args.batch_size}; latency over "
        f"{min(args.latency_tweets, args.num_tweets)} single tweets; features: {args.objects} objects x "
        f"{args.feature_dim}; max_length {args.max_length}.\n"
    )
    header = "| row | tweets/s (batched) | ms/tweet (batched) | x encoder | latency p50 (ms) | latency p95 (ms) | peak RSS (MiB) | RSS over imports (MiB) |"
    if gpu:
        header += " peak GPU (MiB) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        result = results[row]
        ratio = f"{result['batched_ms_per_tweet'] / reference:.2f}" if reference else "n/a"
        line = (
            f"| {row} | {result['tweets_per_second']:.1f} | {result['batched_ms_per_tweet']:.2f} | {ratio} | "
            f"{result['latency_p50_ms']:.1f} | {result['latency_p95_ms']:.1f} | {result['peak_rss_mib']:.0f} | "
            f"{result['rss_over_imports_mib']:.0f} |"
        )
        if gpu:
            line += f" {result.get('peak_gpu_mib', float('nan')):.0f} |"
        print(line)
    command = " ".join(["python", os.path.relpath(os.path.abspath(__file__), os.getcwd())] + (argv if argv is not None else sys.argv[1:]))
    print(f"\nCommand: `{command}` ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
