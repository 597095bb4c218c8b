#!/usr/bin/env python
"""What retrieval context costs at prediction time: the `multimodal-ner` pipeline on a model trained without
context against one trained with `--retrieval_context K` (which retrieves each tweet's neighbours from its saved
training index), on the same test tweets, interleaved over --rounds rounds (median reported).

Rows: ms per tweet in batches of --batch-size and one tweet per call (p50), the retrieval step alone (encoding the
tweets with the index's sentence encoder and searching), and the one-off cost of building the index over the
training tweets (what a training run adds once, before the first epoch; cached by `datasets` afterwards).

    python benchmarks/bench_retrieval.py --plain outputs/experiments/twitter2017-prompt-seed1 \\
        --retrieval outputs/experiments/twitter2017-retrieval3-seed1
"""

import argparse
import os
import statistics
import sys
import time


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", required=True, help="a model folder trained without context")
    parser.add_argument("--retrieval", required=True, help="a model folder trained with --retrieval_context K")
    parser.add_argument("--data", default=os.path.join(PROJECT, "..", "shared", "data", "twitter2017", "test.txt"))
    parser.add_argument("--train-data", default=None, help="CoNLL training file for the index build (default: beside --data)")
    parser.add_argument("--num-tweets", type=int, default=256)
    parser.add_argument("--latency-tweets", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    for name in ("plain", "retrieval", "data"):
        if not os.path.exists(getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)!r} does not exist")
    return args


def read_conll(path: str) -> tuple[list[list[str]], list[list[str]]]:
    words, tags, sentences, labels = [], [], [], []
    with open(path, encoding="utf-8") as handle:
        for line in list(handle) + [""]:
            line = line.rstrip("\n")
            if line.startswith("IMGID:"):
                continue
            if not line.strip():
                if words:
                    sentences.append(words)
                    labels.append(tags)
                words, tags = [], []
                continue
            token, _, tag = line.partition("\t")
            words.append(token)
            tags.append(tag.strip() or "O")
    return sentences, labels


def main():
    args = parse_args()
    import torch
    from transformers import pipeline

    import modeling_pmner  # noqa: F401
    from processing_pmner.pipeline_pmner import PMNERPipeline, register_pipeline
    from processing_pmner.text_retrieval_context import RetrievalIndex

    if args.threads:
        torch.set_num_threads(args.threads)
    register_pipeline()
    tweets = [" ".join(words) for words in read_conll(args.data)[0]][: args.num_tweets]
    pipes = {
        name: pipeline("multimodal-ner", model=folder, pipeline_class=PMNERPipeline, device="cpu")
        for name, folder in (("no context", args.plain), ("retrieval", args.retrieval))
    }
    index = pipes["retrieval"].retrieval_index
    if index is None:
        raise SystemExit(f"--retrieval {args.retrieval}: the model has no retrieval index (trained without --retrieval_context)")
    if pipes["no context"].retrieval_index is not None:
        raise SystemExit(f"--plain {args.plain}: the model retrieves context; give one trained without it")
    times = {name: {"batched": [], "single": []} for name in pipes}
    times["retrieval step"] = {"batched": [], "single": []}
    for round_index in range(args.rounds):
        order = list(pipes) if round_index % 2 == 0 else list(pipes)[::-1]
        for name in order:
            start = time.perf_counter()
            pipes[name](tweets, batch_size=args.batch_size)
            times[name]["batched"].append((time.perf_counter() - start) / len(tweets))
            single = []
            for tweet in tweets[: args.latency_tweets]:
                start = time.perf_counter()
                pipes[name](tweet)
                single.append(time.perf_counter() - start)
            times[name]["single"].append(statistics.median(single))
        start = time.perf_counter()
        for chunk in range(0, len(tweets), args.batch_size):
            index.contexts([tweet.split() for tweet in tweets[chunk : chunk + args.batch_size]])
        times["retrieval step"]["batched"].append((time.perf_counter() - start) / len(tweets))
        single = []
        for tweet in tweets[: args.latency_tweets]:
            start = time.perf_counter()
            index.contexts([tweet.split()])
            single.append(time.perf_counter() - start)
        times["retrieval step"]["single"].append(statistics.median(single))

    train_path = args.train_data or os.path.join(os.path.dirname(args.data), "train.txt")
    build = None
    if os.path.isfile(train_path):
        sentences, labels = read_conll(train_path)
        start = time.perf_counter()
        RetrievalIndex.build(index.encoder, sentences, labels, k=index.k)
        build = (len(sentences), time.perf_counter() - start)

    print(f"command: python {' '.join(sys.argv)}")
    print(f"\n{len(tweets)} tweets of {args.data}, batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"median of {args.rounds} rounds; index: k={index.k}, {len(index)} training tweets, encoder {index.encoder.name}\n")
    print("| row | ms per tweet (batched) | ms per tweet (one per call, p50) |")
    print("|---|---|---|")
    for name, row in times.items():
        print(f"| {name} | {statistics.median(row['batched']) * 1000:.2f} | {statistics.median(row['single']) * 1000:.2f} |")
    if build is not None:
        print(f"\nbuilding the index over {build[0]} training tweets ({train_path}): {build[1]:.1f} s")


if __name__ == "__main__":
    main()
