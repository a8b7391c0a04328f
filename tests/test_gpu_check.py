"""benchmarks/gpu_check.py: the --quick smoke run without Ray, Optuna, faiss, PyYAML, pandas... and
without pcl_tune installed; the reference ProtoNCE against a hand computation and proto_nce."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from pcl_tune.losses import proto_nce

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
# Modules the GPU machine does not have. faiss and yaml may be tried (and fail); the rest never.
BLOCKED = ("ray", "optuna", "faiss", "yaml", "pandas", "sklearn", "scipy", "tqdm", "matplotlib",
           "threadpoolctl", "pyarrow", "tabulate")
MAY_BE_TRIED = {"faiss", "yaml"}
QUICK_ROWS = [
    *(f"k-means torch|20000x32 -> {k}, 20 it" for k in (50, 100, 200)),
    "k-means torch, 3 levels|20000x32 -> 50/100/200",
    *(f"train {name}, {kind}|batch 8, 32 px" for name in ("resnet18 32px", "resnet50 32px")
      for kind in ("plain MoCo", "with prototypes", "prototypes/plain")),
    *(f"{what}|B=32, M=2000, r=256, D=128" for what in (
        "proto_nce (ours), fwd+bwd", "proto_nce (ours, device generator), fwd+bwd", "reference ProtoNCE, fwd+bwd",
        "proto_nce speed-up vs reference", "proto_nce vs reference loss, rel. diff")),
]


def load_gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return load_gpu_check()


def test_quick_run_without_optional_packages_nor_install(tmp_path: Path) -> None:
    stubs, out, markers = tmp_path / "stubs", tmp_path / "out", tmp_path / "tried.txt"
    for name in BLOCKED:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(textwrap.dedent("""\
            import os, sys
            f = sys._getframe(1)  # the file whose import statement got here, past importlib's frames
            while f is not None and ("importlib" in f.f_code.co_filename or f.f_code.co_filename.startswith("<")):
                f = f.f_back
            with open(os.environ["GPU_CHECK_TRIED"], "a") as fh:
                fh.write(__name__ + "\\t" + (f.f_code.co_filename if f is not None else "?") + "\\n")
            raise ImportError(__name__ + " blocked by test_gpu_check")
        """))
    # Drop the editable install's finder so that pcl_tune is importable only through the script's own
    # sys.path entry, then run the script as __main__ from a folder outside the repository.
    wrapper = textwrap.dedent(f"""\
        import importlib.util, runpy, sys
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        sys.path[:] = [p for p in sys.path if p not in ("", {str(REPO)!r})]
        assert importlib.util.find_spec("pcl_tune") is None, "pcl_tune still importable"
        sys.argv = [{str(SCRIPT)!r}, "--quick", "--out", {str(out)!r}]
        runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
    """)
    env = {**os.environ, "PYTHONPATH": str(stubs), "GPU_CHECK_TRIED": str(markers), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", wrapper], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # (module, file of the import statement); torch itself tries tqdm and the like, which is fine.
    tried = [tuple(line.split("\t")) for line in markers.read_text().splitlines()] if markers.exists() else []
    assert not [t for t in tried if t[0] in ("ray", "optuna")], tried
    ours = {name for name, where in tried
            if any(Path(where).resolve().is_relative_to(REPO / d) for d in ("pcl_tune", "benchmarks"))}
    assert ours == MAY_BE_TRIED, tried  # yaml: the stand-in path really ran; faiss: tried, reported missing
    assert "faiss: not importable (faiss blocked by test_gpu_check)" in proc.stdout
    assert "ray: installed (not imported)" in proc.stdout  # found by find_spec, never imported
    assert "yaml: missing (stand-in registered)" in proc.stdout
    assert "torch " + torch.__version__ in proc.stdout and "device cpu (cpu)" in proc.stdout

    md, table = out / "gpu_check.md", out / "gpu_check.csv"
    assert md.is_file() and table.is_file()
    with table.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [f"{r['what']}|{r['size']}" for r in rows] == QUICK_ROWS
    for r in rows:
        value = float(r["value"])
        assert math.isfinite(value), r
        assert r["peak_gpu_mib"] == ""  # CPU: no GPU memory
        if r["what"].endswith("rel. diff"):  # the loss sanity check, judged on every device
            assert 0 <= value <= 0.1 and r["result"] == "pass", r
        else:
            assert value > 0, r
            assert r["result"] == ("n/a (cpu)" if r["target"] else "-"), r
    by_what = {r["what"]: float(r["value"]) for r in rows}
    for name in ("resnet18 32px", "resnet50 32px"):
        ratio = by_what[f"train {name}, with prototypes"] / by_what[f"train {name}, plain MoCo"]
        assert by_what[f"train {name}, prototypes/plain"] == pytest.approx(ratio, rel=1e-9)
    level_sum = sum(float(r["value"]) for r in rows if r["what"] == "k-means torch")
    assert by_what["k-means torch, 3 levels"] == pytest.approx(level_sum, rel=1e-9)
    text = md.read_text()
    assert "| what | size | value | target |" in text and "Optional pieces:" in text
    assert text.count("\n| ") == len(QUICK_ROWS) + 1  # header + one line per row
    assert "| proto_nce vs reference loss, rel. diff |" in proc.stdout


def test_reference_matches_a_hand_computation(gpu_check: ModuleType) -> None:
    # Two rows sharing prototype 0 (the reference keeps both copies as columns), M=3, so the only
    # negatives are 1 and 2 and r=2 takes both: the loss does not depend on the draw's order.
    q = torch.tensor([[0.6, 0.8], [1.0, 0.0]], dtype=torch.float64)
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]], dtype=torch.float64)
    phi = torch.tensor([0.5, 0.25, 0.2], dtype=torch.float64)
    assignment = torch.tensor([0, 0])
    got = gpu_check.reference_proto_nce(q, protos, assignment, phi, 2, random.Random(1))

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))

    qs, ps, ph = q.tolist(), protos.tolist(), phi.tolist()
    losses = []
    for i in range(2):
        s = [dot(qs[i], ps[j]) / ph[j] for j in range(3)]
        # columns: pos of row 0, pos of row 1 (both prototype 0), then prototypes 1 and 2
        denom = 2 * math.exp(s[0]) + math.exp(s[1]) + math.exp(s[2])
        losses.append(-s[0] + math.log(denom))
    assert float(got) == pytest.approx(sum(losses) / 2, rel=1e-12)
    # and not the deduplicated loss (one column for prototype 0), which is smaller
    dedup = sum(-dot(qs[i], ps[0]) / ph[0] + math.log(sum(math.exp(dot(qs[i], ps[j]) / ph[j]) for j in range(3)))
                for i in range(2)) / 2
    assert float(got) > dedup + 0.1


def _case(batch: int, num_protos: int, distinct: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, 16, generator=g, dtype=torch.float64), dim=1)
    protos = F.normalize(torch.randn(num_protos, 16, generator=g, dtype=torch.float64), dim=1)
    phi = 0.05 + 0.45 * torch.rand(num_protos, generator=g, dtype=torch.float64)
    if distinct:
        assignment = torch.randperm(num_protos, generator=g)[:batch]
    else:
        assignment = torch.randint(num_protos // 4, (batch,), generator=g)  # many repeats
    return q, protos, phi, assignment


def _loss_and_grad(fn, q: torch.Tensor) -> tuple[float, torch.Tensor]:  # type: ignore[no-untyped-def]
    q = q.clone().requires_grad_(True)
    loss = fn(q)
    loss.backward()
    assert q.grad is not None
    return float(loss.detach()), q.grad


@pytest.mark.parametrize("distinct", [False, True])
def test_reference_equals_proto_nce_none_on_the_full_complement(gpu_check: ModuleType, distinct: bool) -> None:
    # With every non-positive prototype as a negative both use the same columns (in another order),
    # so proto_nce(duplicates="none") - the reference's column layout - must agree, gradient included.
    q, protos, phi, assignment = _case(24, 60, distinct)
    r = 60 - int(torch.unique(assignment).numel())
    ref = _loss_and_grad(lambda x: gpu_check.reference_proto_nce(x, protos, assignment, phi, r, random.Random(3)), q)
    ours = _loss_and_grad(lambda x: proto_nce(x, protos, assignment, phi, 10_000, duplicates="none")[0], q)
    assert ref[0] == pytest.approx(ours[0], rel=1e-12)
    torch.testing.assert_close(ref[1], ours[1], rtol=1e-10, atol=1e-12)
    # "dedupe" agrees only when no two rows share a prototype.
    dedupe = _loss_and_grad(lambda x: proto_nce(x, protos, assignment, phi, 10_000, duplicates="dedupe")[0], q)
    if distinct:
        assert dedupe[0] == pytest.approx(ref[0], rel=1e-12)
    else:
        assert ref[0] - dedupe[0] > 1e-3


def test_reference_raises_like_the_reference_when_too_few_negatives(gpu_check: ModuleType) -> None:
    q, protos, phi, assignment = _case(8, 20, distinct=True)
    gpu_check.reference_proto_nce(q, protos, assignment, phi, 12, random.Random(0))  # 20 - 8 = 12 remain
    with pytest.raises(ValueError):
        gpu_check.reference_proto_nce(q, protos, assignment, phi, 13, random.Random(0))


def test_reference_draws_distinct_non_positive_negatives(gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    q, protos, phi, assignment = _case(8, 50, distinct=False)
    seen: list[torch.Tensor] = []
    real_cat = torch.cat

    def spy(tensors, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_cat(tensors, *args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(gpu_check.torch, "cat", spy)
    gpu_check.reference_proto_nce(q, protos, assignment, phi, 20, random.Random(5))
    (ids,) = seen
    pos, neg = ids[:8], ids[8:]
    assert torch.equal(pos, assignment) and neg.numel() == 20
    assert len(set(neg.tolist())) == 20 and not set(neg.tolist()) & set(assignment.tolist())


def test_verdicts(gpu_check: ModuleType) -> None:
    row = gpu_check.Row
    assert row("k", "n", 25.0, "s", target=20.0, better="<=").verdict(None) == "FAIL"
    assert row("k", "n", 19.0, "s", target=20.0, better="<=").verdict(None) == "pass"
    assert row("t", "n", 0.85, "x", target=0.9, better=">=").verdict(None) == "FAIL"
    assert row("t", "n", 0.95, "x", target=0.9, better=">=").verdict("n/a (cpu)") == "n/a (cpu)"
    assert row("t", "n", float("nan"), "x", target=0.9, better=">=").verdict(None) == "FAIL"
    sanity = row("s", "n", 0.5, "", target=0.1, better="<=", always_judged=True)
    assert sanity.verdict("n/a (cpu)") == "FAIL"
    assert row("x", "n", 1.0, "s").verdict(None) == "-"
    table = gpu_check.format_table([row("k", "n", 25.0, "s", target=20.0, better="<=", peak_mib=1536.4)], None)
    assert table.splitlines()[2] == "| k | n | 25.00 s | <= 20.00 s | 1.25 | 1536 | FAIL |  |"


def test_a_failing_measurement_leaves_an_error_row_and_exit_code_1(
        gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA out of memory. Tried to allocate 40.00 GiB | more text")

    monkeypatch.setattr(gpu_check, "proto_rows", out_of_memory)
    threads = torch.get_num_threads()
    try:
        rc = gpu_check.main(["--quick", "--device", "cpu", "--sections", "proto", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 1
    with (tmp_path / "gpu_check.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["what"] == "proto_nce" and row["result"] == "ERROR"
    assert row["notes"] == "RuntimeError: CUDA out of memory. Tried to allocate 40.00 GiB / more text"
    assert "| proto_nce |  | - | - | - | n/a | ERROR |" in (tmp_path / "gpu_check.md").read_text()
