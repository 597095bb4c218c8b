"""benchmarks/gpu_check.sh and the tests it runs on a CUDA machine (marked `cuda`, skipped without one): a tiny P-MNER's
bf16 forward and backward on CUDA against the float32 CPU result, and FRR features on CUDA against the CPU's. The
same comparisons run on the CPU (bf16 autocast there) so that the checks themselves are tested everywhere; and the
script's CPU dry run must print every step's row with a number."""

import copy
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import PROJECT, write_tiny_masked_lm
from modeling_pmner import PMNERForTokenClassification
from processing_pmner import PMNERImageProcessor


SCRIPT = os.path.join(PROJECT, "benchmarks", "gpu_check.sh")
STEP_ROWS = (
    "0. build models", "1. CUDA tests", "2a. training, baseline", "2b. training, P-MNER", "3. FRR features",
    "4. pipeline", "5. torchrun pmner-predict",
)


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory):
    return write_tiny_masked_lm(tmp_path_factory.mktemp("gpu-check") / "tiny-bert")


def tiny_batch(model, generator):
    batch, length, objects = 3, 12, 3
    attention = torch.ones(batch, length, dtype=torch.long)
    attention[1, 9:] = 0
    visual_mask = torch.ones(batch, objects, dtype=torch.bool)
    visual_mask[2, 1:] = False
    return {
        "input_ids": torch.randint(5, model.config.text_config.vocab_size, (batch, length), generator=generator),
        "attention_mask": attention,
        "labels": torch.randint(0, model.config.num_labels, (batch, length), generator=generator),
        "visual_features": torch.randn(batch, objects, model.config.visual_feature_dim, generator=generator),
        "visual_mask": visual_mask,
    }


def forward_backward(model, batch, device, bf16: bool):
    """Loss, logits (float32, on the CPU) and the flat gradient of one training forward and backward on `device`."""
    model = copy.deepcopy(model).to(device).train()
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        output = model(**{key: value.to(device) for key, value in batch.items()})
    output.loss.backward()
    gradient = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.grad is not None])
    return output.loss.detach().float().cpu(), output.logits.detach().float().cpu(), gradient


def relative_error(actual, expected) -> float:
    return float((actual - expected).norm() / expected.norm())


def check_bf16_matches_float32(tiny_text_model, device):
    torch.manual_seed(0)
    model = PMNERForTokenClassification.from_text_pretrained(
        tiny_text_model, fusion_num_heads=4, visual_feature_dim=64, max_objects=3
    )
    for module in model.modules():  # training mode without randomness: the two runs see the same network
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = tiny_batch(model, torch.Generator().manual_seed(0))
    loss, logits, gradient = forward_backward(model, batch, "cpu", bf16=False)
    bf16_loss, bf16_logits, bf16_gradient = forward_backward(model, batch, device, bf16=True)
    assert bf16_logits.shape == logits.shape
    assert abs(float(bf16_loss - loss)) < 0.03 * float(loss)
    assert relative_error(bf16_logits, logits) < 0.05
    assert gradient.norm() > 0 and relative_error(bf16_gradient, gradient) < 0.1
    assert torch.nn.functional.cosine_similarity(bf16_gradient, gradient, dim=0) > 0.99


@pytest.mark.cuda
def test_bf16_forward_and_backward_on_cuda_match_float32_on_the_cpu(tiny_text_model):
    check_bf16_matches_float32(tiny_text_model, "cuda")


def test_bf16_forward_and_backward_on_the_cpu_match_float32(tiny_text_model):
    check_bf16_matches_float32(tiny_text_model, "cpu")


def synthetic_images(folder, count: int = 4) -> list[str]:
    generator = np.random.default_rng(0)
    paths = []
    for index in range(count):
        image = generator.integers(0, 256, (120 + 20 * index, 160, 3), dtype=np.uint8)
        path = os.path.join(folder, f"image-{index}.jpg")
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def frr_features(paths, device):
    processor = PMNERImageProcessor(
        detector=None, backbone="resnet18", backbone_weights="random:0", crop_size=64, max_objects=2, batch_size=2
    )
    output = processor(paths, device=device)
    return output["visual_features"], output["visual_mask"]


@pytest.fixture
def full_float32_on_cuda():
    """TF32 off for convolutions and matrix products (cuDNN allows it by default), restored after the test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
def test_frr_features_on_cuda_match_the_cpu(tmp_path, full_float32_on_cuda):
    paths = synthetic_images(tmp_path)
    features, mask = frr_features(paths, "cpu")
    cuda_features, cuda_mask = frr_features(paths, "cuda")
    assert cuda_features.device.type == "cpu"  # returned on the CPU whatever the device
    assert torch.equal(cuda_mask, mask) and mask.any()
    assert features.abs().sum() > 0
    assert relative_error(cuda_features, features) < 1e-3


def run_script(*arguments, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(
        ["bash", SCRIPT, *arguments], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout
    )


def table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4:
            rows[cells[0]] = cells[1:]
    return rows


def test_dry_run_prints_a_row_with_a_number_for_every_step():
    completed = run_script("--dry-run")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    rows = table_rows(completed.stdout)
    for step in STEP_ROWS:
        assert step in rows, (step, completed.stdout[-3000:])
        setting, result, seconds = rows[step]
        assert not result.startswith("FAILED") and re.search(r"\d", result), (step, result)
        assert float(seconds) >= 0
    assert re.match(r"[\d.]+ steps/s", rows["2b. training, P-MNER"][1])
    assert re.match(r"[\d.]+ images/s", rows["3. FRR features"][1])
    assert re.match(r"[\d.]+ tweets/s", rows["4. pipeline"][1])
    assert re.match(r"[\d.]+ tweets/s", rows["5. torchrun pmner-predict"][1])
    assert "skipped (no CUDA here)" in rows["1. CUDA tests"][1]
    # the versions line names the packages the GPU machine brings
    assert re.search(r"torch [\d.]+.*transformers [\d.]+.*safetensors [\d.]+", completed.stdout)


def test_a_failing_step_is_reported_and_the_exit_status_is_not_zero():
    completed = run_script("--dry-run", "--steps", "frr", "--detector", "no_such_detector")
    assert completed.returncode == 1, completed.stdout[-2000:] + completed.stderr[-2000:]
    rows = table_rows(completed.stdout)
    assert rows["3. FRR features"][1].startswith("FAILED: ") and "no_such_detector" in rows["3. FRR features"][1]
    assert completed.stderr.strip().splitlines()[-1] == "gpu_check: FAILED steps: 3. FRR features"


def test_without_cuda_and_without_dry_run_it_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = dict(os.environ, PYTHONPATH=PROJECT)
    completed = subprocess.run(
        [sys.executable, os.path.join(PROJECT, "benchmarks", "gpu_check.py"), "--steps", "frr"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        "gpu_check: no CUDA device here: run on the GPU machine, or pass --dry-run for the CPU check"
    )


def test_the_wheels_to_carry_are_the_pure_python_dependencies_the_gpu_machine_lacks():
    sys.path.insert(0, os.path.join(PROJECT, "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(os.path.join(PROJECT, "benchmarks"))
    pure, compiled = gpu_check.wheel_plan("3.12")
    carried = {name for name, _ in pure}
    assert {"datasets", "evaluate", "accelerate", "seqeval", "dill", "multiprocess"} <= carried
    assert not carried & set(gpu_check.GPU_PROVIDED)  # the GPU machine's own: torch, transformers, ...
    assert {"numpy", "pyarrow"} <= {name for name, _ in compiled}  # compiled: expected there, not carried


def test_the_cuda_step_finds_the_cuda_tests_in_the_test_folders():
    sys.path.insert(0, os.path.join(PROJECT, "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    files = gpu_check.cuda_test_files()
    assert os.path.join(PROJECT, "tests", "benchmarks", "test_gpu_check.py") in files
    assert all("pytest.mark.cuda" in open(path, encoding="utf-8").read() for path in files)
