"""Overlapping word windows for sentences longer than a row, and which window predicts each word.

Copied flat into saved processor folders (remote code) with `processing_pmner.py`: imports nothing.
"""


def word_windows(piece_counts: list[int], budget: int, stride: int) -> list[tuple[int, int]]:
    """Word ranges `[start, end)` whose sub-words fit in `budget`, covering every word; consecutive windows share
    up to `stride` words. Every count must be at most `budget`."""
    count = len(piece_counts)
    if count == 0:
        return [(0, 0)]
    windows = []
    start = 0
    while True:
        end, total = start, 0
        while end < count and total + piece_counts[end] <= budget:
            total += piece_counts[end]
            end += 1
        windows.append((start, end))
        if end >= count:
            return windows
        start = max(start + 1, end - stride)


def window_owner(windows: list[tuple[int, int]], word: int, num_words: int) -> int:
    """Index of the window that predicts `word`: the one where it has the most context on its cut sides (a side at
    the sentence's own start or end counts as unlimited); ties go to the earlier window."""
    best, best_margin = None, None
    for index, (start, end) in enumerate(windows):
        if not start <= word < end:
            continue
        left = word - start if start > 0 else num_words
        right = end - 1 - word if end < num_words else num_words
        margin = min(left, right)
        if best is None or margin > best_margin:
            best, best_margin = index, margin
    if best is None:
        raise ValueError(f"word {word} is in no window {windows}")
    return best


__all__ = ["window_owner", "word_windows"]
