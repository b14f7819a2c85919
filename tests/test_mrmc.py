"""The MRMC analysis against the reference program: every figure of the Iowa OR-DBM MRMC 2.51
output on the Van Dyke et al. (1993) data that pneumoscan.readerstudy.mrmc also reports, read from that
output file and matched to the precision it prints (at least 4 decimals where it prints them),
from both the .lrc and the .imrmc copy of the data; the formats round-trip."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from pneumoscan.readerstudy.mrmc import analyse, trapezoidal_auc
from pneumoscan.readerstudy.ratings import Ratings, RatingsError, read_ratings, write_imrmc, write_lrc

from conftest import DATA, needs_data

MRMC = DATA / "mrmc"
NUMBER = r"(-?\d+\.\d+)"


def close(ours: float, printed: str) -> bool:
    """Equal to the printed figure at the precision it was printed with."""
    decimals = len(printed.split(".")[1])
    return abs(ours - float(printed)) <= 0.5 * 10 ** -decimals + 1e-12


def section(text: str, start: str, end: str | None = None) -> str:
    body = text[text.index(start):]
    return body[:body.index(end)] if end else body


@pytest.fixture(scope="module")
def reference() -> str:
    return (MRMC / "VanDyke_OR-DBM-MRMC-2.51.txt").read_text()


@needs_data
@pytest.mark.parametrize("name", ["VanDyke.lrc", "VanDyke.imrmc"])
def test_van_dyke_matches_the_iowa_program(reference, name):
    result = analyse(read_ratings(MRMC / name))
    checked = 0

    def check(ours: float, printed: str) -> None:
        nonlocal checked
        assert close(ours, printed), f"{ours} ≠ {printed}"
        checked += 1

    t0, t1 = result["design"]["treatments"]
    # reader AUCs and treatment means
    table = section(reference, "TREATMENT x READER AUC ESTIMATES", "TREATMENT AUC MEANS")
    rows = re.findall(rf"^\s+(\d)\s+{NUMBER}\s+{NUMBER}\s*$", table, re.MULTILINE)
    assert len(rows) == 5
    for (reader, a, b), ours_reader in zip(rows, result["design"]["readers"]):
        check(result["reader_auc"][t0][ours_reader], a)
        check(result["reader_auc"][t1][ours_reader], b)
    means = re.findall(rf"^\s+([12])\s+{NUMBER}\s*$", section(reference, "TREATMENT AUC MEANS", "MEAN DIFFERENCES"), re.MULTILINE)
    check(result["auc"][t0], means[0][1])
    check(result["auc"][t1], means[1][1])
    # ANOVA
    anova = section(reference, "TREATMENT X READER ANOVA of AUCs", "READER ANOVAs")
    for source, key in (("T", "T"), ("R", "R"), (r"T\*R", "TR")):
        ss, df, ms = re.search(rf"^\s+{source}\s+{NUMBER}\s+(\d+)\s+{NUMBER}", anova, re.MULTILINE).groups()
        check(result["anova"][key]["SS"], ss)
        check(result["anova"][key]["MS"], ms)
        assert result["anova"][key]["df"] == int(df)
    ms_r = re.search(rf"^\s+R\s+4\s+{NUMBER}\s+{NUMBER}", section(reference, "READER ANOVAs", "Variance component"), re.MULTILINE)
    check(result["anova"]["R_within_treatment"][t0], ms_r.group(1))
    check(result["anova"]["R_within_treatment"][t1], ms_r.group(2))
    # variance components
    components = section(reference, "OR Component", "Corresponding DBM")
    for label, key in (("Var(R)", "var_r"), ("Var(T*R)", "var_tr"), ("Var(Error)", "var_error")):
        check(result["or_components"][key], re.search(rf"{re.escape(label)}\s+{NUMBER}", components).group(1))
    for k in (1, 2, 3):
        value, corr = re.search(rf"COV{k}\s+{NUMBER}\s+{NUMBER}", components).groups()
        check(result["or_components"][f"cov{k}"], value)
        check(result["or_components"][f"corr{k}"], corr)
    dbm = section(reference, "DBM Component", "Analysis 1")
    for label, key in (("Var(R)", "var_r"), ("Var(C)", "var_c"), ("Var(T*R)", "var_tr"), ("Var(T*C)", "var_tc"),
                       ("Var(R*C)", "var_rc"), ("Var(T*R*C) + Var(Error)", "var_trc_error")):
        check(result["dbm_components"][key], re.search(rf"{re.escape(label)}\s+{NUMBER}", dbm).group(1))

    # Analysis 1: random readers and random cases
    rrrc = section(reference, "Analysis 1 (OR Analysis)", "Analysis 2 (OR Analysis)")
    ms_t, f, p = re.search(rf"Treatment\s+1\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}", rrrc).groups()
    check(result["anova"]["T"]["MS"], ms_t)
    check(result["rrrc"]["F"], f)
    check(result["rrrc"]["p"], p)
    ddf, error_ms = re.search(rf"Error term\s+{NUMBER}\s+{NUMBER}", rrrc).groups()
    check(result["rrrc"]["ddf"], ddf)
    check(result["rrrc"]["error_term"], error_ms)
    pair = result["rrrc"]["pairs"][0]
    diff, se, dfp, tv, pv, lo, hi = re.search(
        rf"1 - 2\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+\(\s*{NUMBER}\s*,\s*{NUMBER}\)", rrrc).groups()
    for ours, printed in ((pair["difference"], diff), (pair["stderr"], se), (pair["df"], dfp), (pair["t"], tv),
                          (pair["p"], pv), (pair["ci"][0], lo), (pair["ci"][1], hi)):
        check(ours, printed)
    singles = re.findall(rf"^\s+([12])\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+\({NUMBER}\s*,\s*{NUMBER}\)\s+{NUMBER}",
                         rrrc, re.MULTILINE)
    assert len(singles) == 2
    for ours, (_, auc, se, df, lo, hi, cov2) in zip(result["rrrc"]["single"], singles):
        for a, b in ((ours["auc"], auc), (ours["stderr"], se), (ours["df"], df), (ours["ci"][0], lo),
                     (ours["ci"][1], hi), (ours["cov2"], cov2)):
            check(a, b)

    # Analysis 2: fixed readers and random cases
    frrc = section(reference, "Analysis 2 (OR Analysis)", "Analysis 3 (OR Analysis)")
    chi2, p = re.search(rf"^\s+{NUMBER}\s+1\s+{NUMBER}\s*$", frrc, re.MULTILINE).groups()
    check(result["frrc"]["chi2"], chi2)
    check(result["frrc"]["p"], p)
    pair = result["frrc"]["pairs"][0]
    diff, se, z, pv, lo, hi = re.search(
        rf"^\s+1 - 2\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+\(\s*{NUMBER}\s*,\s*{NUMBER}\)", frrc, re.MULTILINE).groups()
    for ours, printed in ((pair["difference"], diff), (pair["stderr"], se), (pair["z"], z), (pair["p"], pv),
                          (pair["ci"][0], lo), (pair["ci"][1], hi)):
        check(ours, printed)
    singles = re.findall(rf"^\s+([12])\s+{NUMBER}\s+{NUMBER}\s+\({NUMBER}\s*,\s*{NUMBER}\)\s*$", frrc, re.MULTILINE)
    variances = re.findall(rf"^\s+([12])\s+{NUMBER}\s+{NUMBER}\s*$", frrc, re.MULTILINE)
    for ours, (_, auc, se, lo, hi), (_, var, cov2) in zip(result["frrc"]["single"], singles, variances):
        for a, b in ((ours["auc"], auc), (ours["stderr"], se), (ours["ci"][0], lo), (ours["ci"][1], hi),
                     (ours["var_error"], var), (ours["cov2"], cov2)):
            check(a, b)
    readers = re.findall(rf"^\s+([1-5])\s+1 - 2\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+\(\s*{NUMBER}\s*,\s*{NUMBER}\)",
                         frrc, re.MULTILINE)
    reader_vars = re.findall(rf"^\s+([1-5])\s+{NUMBER}\s+{NUMBER}\s*$", section(frrc, "Reader  Var(Error)"), re.MULTILINE)
    assert len(readers) == 5 and len(reader_vars) == 5
    for ours, (_, diff, se, z, pv, lo, hi), (_, var, cov1) in zip(result["frrc"]["readers"], readers, reader_vars):
        for a, b in ((ours["difference"], diff), (ours["stderr"], se), (ours["z"], z), (ours["p"], pv),
                     (ours["ci"][0], lo), (ours["ci"][1], hi), (ours["var_error"], var), (ours["cov1"], cov1)):
            check(a, b)

    # Analysis 3: random readers and fixed cases
    rrfc = section(reference, "Analysis 3 (OR Analysis)", "REFERENCES")
    ms_t, f, p = re.search(rf"Treatment\s+1\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}", rrfc).groups()
    check(result["rrfc"]["F"], f)
    check(result["rrfc"]["p"], p)
    pair = result["rrfc"]["pairs"][0]
    diff, se, tv, pv, lo, hi = re.search(
        rf"1 - 2\s+{NUMBER}\s+{NUMBER}\s+4\s+{NUMBER}\s+{NUMBER}\s+\(\s*{NUMBER}\s*,\s*{NUMBER}\)", rrfc).groups()
    for ours, printed in ((pair["difference"], diff), (pair["stderr"], se), (pair["t"], tv), (pair["p"], pv),
                          (pair["ci"][0], lo), (pair["ci"][1], hi)):
        check(ours, printed)
    singles = re.findall(rf"^\s+([12])\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+4\s+\({NUMBER}\s*,\s*{NUMBER}\)", rrfc, re.MULTILINE)
    for ours, (_, auc, ms, se, lo, hi) in zip(result["rrfc"]["single"], singles):
        for a, b in ((ours["auc"], auc), (ours["ms_r"], ms), (ours["stderr"], se), (ours["ci"][0], lo), (ours["ci"][1], hi)):
            check(a, b)
    assert checked >= 110, checked


@needs_data
def test_formats_round_trip_and_the_command_writes_the_study(tmp_path):
    ratings = read_ratings(MRMC / "VanDyke.imrmc")
    write_lrc(ratings, tmp_path / "v.lrc")
    write_imrmc(ratings, tmp_path / "v.imrmc")
    for path in (tmp_path / "v.lrc", tmp_path / "v.imrmc"):
        again = read_ratings(path)
        np.testing.assert_array_equal(np.sort(again.scores, axis=2), np.sort(ratings.scores, axis=2))
        assert analyse(again)["rrrc"]["F"] == pytest.approx(analyse(ratings)["rrrc"]["F"], rel=1e-12)
    csv_path = tmp_path / "ratings.csv"
    lines = ["reader,case,treatment,score,truth"]
    for t, treatment in enumerate(ratings.treatments):
        for r, reader in enumerate(ratings.readers):
            lines += [f"{reader},{case},{treatment},{ratings.scores[t, r, c]},{ratings.truth[c]}"
                      for c, case in enumerate(ratings.cases)]
    csv_path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "study"
    run = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "study", "analyse", str(csv_path), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    study = json.loads((out / "study.json").read_text())
    assert study["rrrc"]["F"] == pytest.approx(4.456318, abs=1e-5) and study["frrc"]["chi2"] == pytest.approx(5.47595, abs=1e-5)
    assert set(study["auc"]) == {"0", "1"} and "ddf" in study["rrrc"] and "p" in study["rrfc"]
    assert "Obuchowski" in (out / "study.md").read_text() and (out / "study.html").stat().st_size > 10_000
    assert (out / "study.imrmc").exists() and (out / "study.lrc").exists()
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\n")
    refused = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "study", "analyse", str(bad), "--out",
                              str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "not a ratings CSV" in refused.stderr and "Traceback" not in refused.stderr


def test_auc_ties_and_jackknife_and_delong_agree_in_size():
    scores = np.array([[[1, 2, 2, 3, 4, 4], [2, 1, 3, 1, 4, 2]], [[1, 1, 2, 2, 3, 5], [1, 3, 2, 1, 5, 4]]], float)
    truth = np.array([0, 0, 1, 0, 1, 1])
    auc = trapezoidal_auc(scores, truth)
    assert auc[0, 0] == pytest.approx((1 + 0.5 + 0 + 3 + 3) / 9)  # abnormal 2 against normal 1, 2, 3; the 4s beat all
    ratings = Ratings(scores, truth, ["A", "B"], ["r1", "r2"], [str(k) for k in range(6)])
    jack, delong = analyse(ratings), analyse(ratings, covariance="delong")
    assert jack["auc"] == delong["auc"] and jack["or_components"]["var_error"] > 0 < delong["or_components"]["var_error"]
    with pytest.raises(RatingsError, match="2 treatments and 2 readers"):
        Ratings(scores[:1], truth, ["A"], ["r1", "r2"], [str(k) for k in range(6)])


def _ratings_csv(rows: list[tuple[str, str, str, str, str]]) -> str:
    return "reader,case,treatment,score,truth\n" + "".join(",".join(row) + "\n" for row in rows)


def _crossed(cases: int = 6, score=lambda r, c, t: str((c * 7 + r * 3 + (t == "B")) % 5)) -> list[tuple]:
    return [(f"R{r}", f"c{c}", t, score(r, c, t), str(c % 2)) for r in range(3) for c in range(cases) for t in "AB"]


@pytest.mark.parametrize(("rows", "refusal"), [
    (_crossed(cases=2), "too few cases to analyse: 1 normal and 1 abnormal"),
    (_crossed() + [("R0", "c0", "A", "3", "0")], "rated case 'c0' twice under 'A'"),
    (_crossed()[1:], "fully crossed design"),
    ([(r, c, t, s, "inf" if c == "c3" else v) for r, c, t, s, v in _crossed()], "truth 'inf' is not 0 or 1"),
    ([(r, c, t, s, "nan" if c == "c3" else v) for r, c, t, s, v in _crossed()], "truth 'nan' is not 0 or 1"),
    ([(r, c, t, "inf" if c == "c2" else s, v) for r, c, t, s, v in _crossed()], "score 'inf' is not a finite number"),
    (_crossed(score=lambda r, c, t: "50"), "cannot be analysed: the AUCs do not vary"),
])
def test_what_cannot_be_analysed_is_refused_in_one_line_with_no_output(tmp_path, rows, refusal):
    """A p-value goes into a paper: a file the analysis cannot handle gets a one-line refusal
    naming the problem and no study files (probe v5 M7, L5)."""
    source = tmp_path / "ratings.csv"
    source.write_text(_ratings_csv(rows))
    run = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "study", "analyse", str(source),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2 and refusal in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not list((tmp_path / "out").glob("*"))


def test_a_design_that_is_not_crossed_is_refused_before_any_array_is_allocated(tmp_path):
    """12,000 readers each rating their own case would need a 12,000² array per treatment:
    refused from the row count (probe v5 M8)."""
    source = tmp_path / "bomb.csv"
    source.write_text(_ratings_csv([(f"R{k}", f"c{k}", t, "1", str(k % 2)) for k in range(12_000) for t in "AB"]))
    with pytest.raises(RatingsError, match="24,000 ratings for 2 treatments × 12000 readers × 12000 cases"):
        read_ratings(source)
    (tmp_path / "bin.lrc").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(RatingsError):
        read_ratings(tmp_path / "bin.lrc")
