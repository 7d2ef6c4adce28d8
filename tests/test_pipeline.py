"""The whole pipeline, end to end, on the tiny profile in a temporary git + DVC project."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run
from triage.evaluate.evaluation import headline_file
from triage.report import headline_summary
from triage.schema import LABELS

pytestmark = pytest.mark.e2e

RUNS = ("tiny-4bit-medical_fast", "tiny-4bit-balanced_safe")
HEADLINE = ("accuracy", "macro_f1", "ed_recall", "ed_f2", "ed_fnr", "ed_fn", "safe", "test_loss")


def test_committed_params_define_the_full_study():
    listed = run(["dvc", "stage", "list"], ROOT).stdout.split("\n")
    names = [line.split()[0] for line in listed if line.strip()]
    trains = [n for n in names if n.startswith("train@")]
    evaluates = [n for n in names if n.startswith("evaluate@")]
    assert len(trains) == 60 and len(evaluates) == 60
    assert "train@smollm2-135m-4bit-balanced_safe" in trains
    assert "evaluate@gemma3-270m-8bit-medical_baseline" in evaluates


@pytest.fixture(scope="module")
def reproduced(tiny_project):
    run(["dvc", "repro"], tiny_project)
    return tiny_project


def test_every_declared_output_exists(reproduced):
    lock = yaml.safe_load((reproduced / "dvc.lock").read_text())
    outputs = [o["path"] for stage in lock["stages"].values() for key in ("outs",) for o in stage.get(key, [])]
    assert outputs, "dvc.lock lists no outputs"
    missing = [path for path in outputs if not (reproduced / path).exists()]
    assert not missing
    for name in RUNS:
        run_dir = reproduced / "metrics/runs" / name
        evaluation, compact, training = (
            json.loads((run_dir / f).read_text()) for f in ("evaluation.json", "eval.json", "train.json")
        )
        assert set(HEADLINE) <= set(evaluation)
        assert compact == headline_file(evaluation, training["peak_memory_mb"])
        assert (reproduced / "runs" / name / "adapter/adapters.safetensors").is_file()
        assert 0.0 <= training["final_train_accuracy"] <= 1.0  # argmax accuracy on a sample of its training cases
    study = json.loads((reproduced / "reports/study.json").read_text())
    assert set(study["runs"]) == set(RUNS) and study["missing"] == []
    assert json.loads((reproduced / "metrics/summary.json").read_text()) == headline_summary(study)


def test_study_json_holds_both_conditions_for_every_learner_and_both_constant_rows(reproduced):
    study = json.loads((reproduced / "reports/study.json").read_text())
    assert set(study["references"]) == {"always-ED", "majority"}
    assert set(study["classical"]) == {"tfidf-logreg", "tiny-4bit-probe"}
    assert study["baselines"] and study["runs"]
    for block in ("runs", "baselines", "classical", "references"):
        for row in study[block].values():
            assert set(row["conditions"]) == {"wording", "complaint"}, (block, row["run"])
            for condition in row["conditions"].values():
                for key in ("accuracy", "ed_recall", "ed_auroc"):
                    assert key in condition and set(condition["ci95"][key]) == {"low", "high"}
    assert {row["condition"] for row in study["paired"]} == {"wording", "complaint"}
    assert study["selection"]["condition"] == "wording" and study["selection"]["split"] == "valid"
    assert all(study["references"][name]["constant"] for name in ("always-ED", "majority"))
    report = (reproduced / "reports/report.md").read_text()
    assert "## Test conditions side by side" in report and "| always-ED" in report


def test_the_report_embeds_figures_that_exist_as_png_and_svg(reproduced):
    report = (reproduced / "reports/report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) >= 5, report
    for link in links:
        png = reproduced / "reports" / link
        assert png.read_bytes()[:4] == b"\x89PNG" and png.with_suffix(".svg").is_file(), link


def test_second_repro_is_a_no_op(reproduced):
    out = run(["dvc", "repro"], reproduced).stdout
    assert "Running stage" not in out


def test_editing_one_config_reruns_only_its_stages(reproduced):
    params_path = reproduced / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["configs"]["balanced_safe"]["scale"] = 9.0
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = run(["dvc", "status", "--json"], reproduced).stdout
        changed = set(json.loads(status))
    finally:
        params_path.write_text(original)
    # evaluate@ also reads the config (its target ED recall sets the tuned threshold's target).
    assert changed == {"train@tiny-4bit-balanced_safe", "evaluate@tiny-4bit-balanced_safe"}


def test_predict_answers_with_label_probabilities_and_uncertainty(reproduced):
    out = run(
        [
            "python",
            "-m",
            "triage",
            "predict",
            "--run",
            "tiny-4bit-balanced_safe",
            "--json",
            "Crushing chest pain and sweating",
        ],
        reproduced,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    headline = yaml.safe_load((reproduced / "params.yaml").read_text())["evaluate"]["decision"]
    assert result["decision_rule"] == headline and result["pred"] == result[headline] in LABELS
    assert abs(result["p_ED"] + result["p_GP"] + result["p_HOME"] - 1) < 1e-3
    assert result["mc_uncertainty"] >= 0 and isinstance(result["flagged"], bool)  # balanced_safe has dropout
    short = yaml.safe_load((reproduced / "params.yaml").read_text())
    short["train"]["max_seq_length"] = 16
    (reproduced / "short.yaml").write_text(yaml.safe_dump(short))
    (reproduced / "long.jsonl").write_text('{"id": "m-7", "text": "Crushing chest pain and sweating"}\n')
    long = run(
        [
            "python",
            "-m",
            "triage",
            "--params",
            "short.yaml",
            "predict",
            "--run",
            "tiny-4bit-balanced_safe",
            "--file",
            "long.jsonl",
        ],
        reproduced,
        check=False,
    )
    assert long.returncode == 1 and "long.jsonl: field 'text': message 'm-7' is" in long.stderr, long.stderr
    assert "above train.max_seq_length=16" in long.stderr and "Traceback" not in long.stderr
    missing = run(["python", "-m", "triage", "predict", "--run", "nope-4bit-x", "hello"], reproduced, check=False)
    assert missing.returncode == 1 and "unknown run 'nope-4bit-x'" in missing.stderr
    assert "tiny-4bit-balanced_safe" in missing.stderr


def test_predict_of_the_test_split_reproduces_the_evaluate_stage(reproduced):
    run_dir = reproduced / "metrics/runs/tiny-4bit-balanced_safe"
    test = [json.loads(line) for line in (reproduced / "data/prepared/test.jsonl").read_text().splitlines()]
    messages = [{"id": case["id"], "text": case["prompt"].split("\n\nPatient message: ", 1)[1]} for case in test]
    (reproduced / "messages.jsonl").write_text("".join(json.dumps(m) + "\n" for m in messages))
    out = run(
        ["python", "-m", "triage", "predict", "--run", "tiny-4bit-balanced_safe", "--json", "--file", "messages.jsonl"],
        reproduced,
    ).stdout
    answers = [json.loads(line) for line in out.strip().splitlines()]
    expected = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == [e["id"] for e in expected]
    for answer, row in zip(answers, expected):
        for key in ("pred", "argmax", "cost_aware", "ed_threshold", "mc_vote"):
            assert answer.get(key) == row.get(key), (row["id"], key)
        for key in ("p_ED", "p_GP", "p_HOME", "mc_uncertainty"):
            assert answer[key] == pytest.approx(row[key], abs=1e-5), (row["id"], key)


def test_export_fuses_the_adapter_and_reports_its_check(reproduced, tmp_path):
    out = run(
        ["python", "-m", "triage", "export", "--run", "tiny-4bit-medical_fast", "--out", str(tmp_path / "exported")],
        reproduced,
    ).stdout
    cases = len((reproduced / "data/prepared/test.jsonl").read_text().splitlines())
    assert f"check on the {cases} test cases: argmax agreement with base + adapter" in out
    from mlx_lm import load

    model, _ = load(str(tmp_path / "exported"))
    assert not any("lora" in name for name, _ in model.named_modules())


def test_uncertainty_histograms_only_for_runs_with_mc_dropout(reproduced):
    plots = reproduced / "metrics/plots/uncertainty"
    assert [p.name for p in plots.iterdir()] == ["tiny-4bit-balanced_safe.json"]  # medical_fast has dropout 0
    bins = json.loads((plots / "tiny-4bit-balanced_safe.json").read_text())
    cases = (reproduced / "metrics/runs/tiny-4bit-balanced_safe/predictions.jsonl").read_text().splitlines()
    assert sum(b["cases"] for b in bins) == len(cases)


def test_dvc_plots_show_renders_every_plot(reproduced):
    shown = json.loads(run(["dvc", "plots", "show", "--json"], reproduced).stdout)
    assert not shown.get("errors"), shown.get("errors")
    ids = set(shown["data"])
    assert all(render[0]["content"]["data"]["values"] for render in shown["data"].values())
    for name in RUNS:
        assert f"metrics/runs/{name}/confusion.csv" in ids
        assert f"metrics/runs/{name}/dvclive/plots/metrics/train/loss.tsv" in ids
        assert f"metrics/runs/{name}/dvclive/plots/metrics/val/accuracy.tsv" in ids
    assert "metrics/baseline/tiny-4bit/confusion.csv" in ids
    assert "metrics/plots/ed_recall_vs_memory.json" in ids
    assert "metrics/plots/uncertainty/tiny-4bit-balanced_safe.json" in ids


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(browser() is None, reason="no chromium (make test installs it as root on Debian)")
def test_dvc_plots_show_renders_every_plot_with_the_network_blocked(reproduced, tmp_path):
    """DVC's own page loads Vega from a CDN and is blank offline; the project's template inlines it."""
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], reproduced)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "<script src=" not in page
    plots = page.count("vegaEmbed('#")
    dom = subprocess.run(
        [
            browser(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--virtual-time-budget=15000",
            "--dump-dom",
            (tmp_path / "plots" / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    assert plots >= 8 and dom.count('class="vega-embed') == plots


def leaves(tree) -> int:
    return sum(map(leaves, tree.values())) if isinstance(tree, dict) else 1


def test_dvc_metrics_are_a_dozen_numbers_per_run_and_a_compact_summary(reproduced):
    """What a pull request's `dvc metrics diff` shows; provenance and per-rule detail stay in outs."""
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], reproduced).stdout)
    files = next(iter(shown.values()))["data"]
    logs = {f"metrics/runs/{name}/dvclive/metrics.json" for name in RUNS}
    assert set(files) == {f"metrics/runs/{name}/eval.json" for name in RUNS} | logs | {"metrics/summary.json"}
    for log in logs:  # DVCLive's last values: the step, train loss and accuracy, val loss, accuracy and ED AUROC
        assert leaves(files[log]["data"]) <= 6 and files[log]["data"]["step"] > 0
    study = json.loads((reproduced / "reports/study.json").read_text())
    for name in RUNS:
        compact = files[f"metrics/runs/{name}/eval.json"]["data"]
        # a dozen headline numbers, the ED recall bound, and each condition's accuracy, ED recall and ED AUROC
        assert leaves(compact) <= 14 + 2 * 3 and compact["accuracy"] == study["runs"][name]["accuracy"]
        assert compact["wording"]["accuracy"] == study["runs"][name]["conditions"]["wording"]["accuracy"]
    # counts and the best run (5), its test headline (4) and per condition (2 x 3), and its paired rows against
    # the zero-shot baseline, tfidf-logreg and its probe: 3 x 2 conditions x 2 metrics x (diff, low, high)
    assert leaves(files["metrics/summary.json"]["data"]) <= 5 + 4 + 6 + 36
    diff = run(["dvc", "metrics", "diff", "--md", "--all", "HEAD"], reproduced).stdout
    rows = [line for line in diff.splitlines() if line.startswith("| metrics/")]
    assert 0 < len(rows) <= sum(leaves(f["data"]) for f in files.values()) <= 26 * len(RUNS) + 51


def test_the_reviewers_exp_show_has_the_headline_and_both_conditions_per_run(reproduced):
    """scripts/exp-headline.sh, the README's compact `dvc exp show`.

    Its patterns must keep matching DVC's column names.
    """
    table = run(["bash", str(ROOT / "scripts/exp-headline.sh"), "--csv"], reproduced).stdout
    conditions = [f"{c}.{key}" for c in ("wording", "complaint") for key in ("accuracy", "ed_recall", "ed_auroc")]
    per_run = ("accuracy", "ed_recall", "ci95.ed_recall.low", "ed_auroc", "safe", *conditions)
    best = ["n_safe"]
    if json.loads((reproduced / "reports/study.json").read_text())["best"]:  # none is chosen when all are constant
        best += ["best", "best_test.accuracy", "best_test.ed_recall", "best_test.ed_auroc", "best_test.safe"]
        best += [f"best_test.{key}" for key in conditions]
    expected = {f"metrics/runs/{name}/eval.json:{key}" for name in RUNS for key in per_run} | set(best)
    assert set(table.splitlines()[0].split(",")) == {"Experiment"} | expected


@pytest.fixture
def own_copy(reproduced, tmp_path) -> Path:
    """A copy of the reproduced project (git, DVC cache and all) for a test that changes its workspace,
    so that no test depends on the order the others run in."""
    copy = tmp_path / "project"
    shutil.copytree(reproduced, copy, symlinks=True)
    return copy


def test_lora_rank_override_reaches_the_adapter(own_copy):
    run(["dvc", "exp", "run", "-S", "lora.rank=16", "-S", "run.configs=[medical_fast]"], own_copy)
    config = json.loads((own_copy / "runs/tiny-4bit-medical_fast/adapter/adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 16
    import mlx.core as mx

    weights = mx.load(str(own_copy / "runs/tiny-4bit-medical_fast/adapter/adapters.safetensors"))
    ranks = {v.shape[-1] for k, v in weights.items() if k.endswith("lora_a")}
    assert ranks == {16}


def queue_settled(project) -> bool:
    status = run(["dvc", "queue", "status"], project).stdout
    return not any(word in status for word in ("Queued", "Running"))


def test_queued_experiments_run_two_at_a_time(own_copy):
    """`dvc exp run --queue` + `dvc queue start -j 2`; each retrains only the run its change touches."""
    names = {rank: f"queued-rank-{rank}" for rank in (4, 12)}
    for rank, name in names.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"configs.medical_fast.rank={rank}"], own_copy)
    run(["dvc", "queue", "start", "-j", "2"], own_copy)
    try:
        deadline = time.monotonic() + 900
        while not queue_settled(own_copy) and time.monotonic() < deadline:
            time.sleep(3)
    finally:
        run(["dvc", "queue", "stop"], own_copy, check=False)
    status = run(["dvc", "queue", "status"], own_copy).stdout
    assert all(f"{name}" in status for name in names.values()) and "Failed" not in status, status

    shown = json.loads(run(["dvc", "exp", "show", "--json"], own_copy).stdout)
    experiments = {
        exp["name"]: exp["data"] for base in shown for group in base.get("experiments") or [] for exp in group["revs"]
    }
    for rank, name in names.items():
        data = experiments[name]
        assert data["params"]["params.yaml"]["data"]["configs"]["medical_fast"]["rank"] == rank
        summary = data["metrics"]["metrics/summary.json"]["data"]
        # the tiny model's runs may all answer one label, and then none is chosen
        assert summary["n_runs"] == len(RUNS) and summary.get("best") in (*RUNS, None)
        logs = run(["dvc", "queue", "logs", name], own_copy).stdout
        assert "Stage 'train@tiny-4bit-balanced_safe' is cached" in logs, logs
        assert "Running stage 'train@tiny-4bit-medical_fast'" in logs, logs
