"""report() on a hand-built module with quantized, excluded and unsupported sites."""

import torch
from torch import nn

from qcompile.core.quantizer import Quantizer, QuantSpec
from qcompile.passes.sites import Site, SiteKind, SiteStatus
from qcompile.report import Report, SiteRow, format_report, report, report_rows


class Prepared(nn.Module):
    """Three sites as the insert pass would leave them; only the quantizers matter here."""

    def __init__(self):
        super().__init__()
        self.q_input = Quantizer(QuantSpec("int8"))
        self.q_weight = Quantizer(QuantSpec("int8", axis=0))
        self.attn_input = Quantizer(QuantSpec("fp8"))
        self.attn_other = Quantizer(QuantSpec("int4", block_size=32, dynamic=True))
        self.qcompile_sites = [
            Site("encoder.query", SiteKind.LINEAR, "linear",
                 quantizers={"input": "q_input", "weight": "q_weight"}),
            Site("encoder.matmul_0", SiteKind.MATMUL, "matmul",
                 quantizers={"input": "attn_input", "other": "attn_other"}),
            Site("lm_head", SiteKind.LINEAR, "linear_1", SiteStatus.EXCLUDED, "output head"),
            Site("conv", SiteKind.CONV, "conv2d", SiteStatus.UNSUPPORTED, "grouped convolution"),
        ]


def test_one_row_per_site_with_formats_and_status():
    rows = report_rows(Prepared())
    assert [r.site for r in rows] == ["encoder.query", "encoder.matmul_0", "lm_head", "conv"]
    query, matmul, head, conv = rows
    assert (query.kind, query.input, query.weight, query.other) == (
        "linear", "int8", "int8 axis=0", "-"
    )
    assert (matmul.kind, matmul.input, matmul.other) == ("matmul", "fp8", "int4 block=32")
    assert (head.status, head.reason, head.weight, head.amax) == (
        "excluded", "output head", "-", "-"
    )
    assert (conv.kind, conv.status, conv.reason) == ("conv", "unsupported", "grouped convolution")


def test_amax_summary_follows_calibration_state():
    model = Prepared()
    assert report_rows(model)[0].amax == "input=uncalibrated, weight=uncalibrated"
    assert report_rows(model)[1].amax == "input=uncalibrated, other=dynamic"
    model.q_input.set_amax(torch.tensor(2.5))
    model.q_weight.set_amax(torch.tensor([0.125, 3.0, 1.0]))
    assert report_rows(model)[0].amax == "input=2.5, weight=0.125..3 (3)"


def test_disabled_quantizer_is_marked():
    model = Prepared()
    model.attn_input.enabled = False
    assert report_rows(model)[1].input == "fp8 (off)"


def test_text_table_is_aligned_with_a_summary():
    text = str(report(Prepared()))
    lines = text.splitlines()
    assert lines[0].split() == [
        "site", "kind", "weight", "input", "other", "amax", "status", "reason"
    ]
    status_column = lines[0].index("status")
    assert [line[status_column:].split()[0] for line in lines[2:6]] == [
        "quantized", "quantized", "excluded", "unsupported"
    ]
    assert lines[-1] == "4 sites: 2 quantized, 1 excluded, 1 unsupported"


def test_report_object_gives_rows_dicts_and_text():
    result = report(Prepared())
    assert isinstance(result, Report) and all(isinstance(r, SiteRow) for r in result.rows)
    assert result.as_dicts()[2] == {
        "site": "lm_head", "kind": "linear", "weight": "-", "input": "-", "other": "-",
        "amax": "-", "status": "excluded", "reason": "output head",
    }
    assert repr(result) == str(result) == format_report(result.rows)


def test_without_sites_one_row_per_quantizer_with_guessed_role():
    model = nn.Module()
    model.fc = nn.Module()
    model.fc.input_quantizer = Quantizer(QuantSpec("nvfp4"))
    model.fc.weight_quantizer = Quantizer(QuantSpec("mxfp4"))
    rows = report_rows(model)
    assert [(r.site, r.input, r.weight, r.amax) for r in rows] == [
        ("fc.input_quantizer", "nvfp4", "-", "input=uncalibrated"),
        ("fc.weight_quantizer", "-", "mxfp4", "weight=dynamic"),
    ]


def test_weight_coverage_counts_elements_once_per_weight_and_expert():
    spec = {"weight": QuantSpec("int8", axis=0, dynamic=True)}
    sites = [
        Site("q", SiteKind.LINEAR, "l0", specs=spec, weight="q.weight", weight_size=600),
        Site("e.0.up", SiteKind.LINEAR, "l1", specs=spec, weight="e.up", expert=0, weight_size=100),
        Site("e.1.up", SiteKind.LINEAR, "l2", SiteStatus.UNSUPPORTED, "K=7 is not a multiple",
             weight="e.up", expert=1, weight_size=100),
        Site("m", SiteKind.MATMUL, "mm", specs={"input": QuantSpec("int8")}),
        Site("lm_head", SiteKind.LINEAR, "l3", SiteStatus.EXCLUDED, "output head",
             weight="emb.weight", weight_size=200),
        Site("tied", SiteKind.LINEAR, "l4", SiteStatus.EXCLUDED, "excluded",
             weight="emb.weight", weight_size=200),  # the same weight: counted once
    ]
    model = Prepared()
    model.qcompile_sites = sites
    coverage = report(model).coverage
    assert (coverage.quantized, coverage.total) == (700, 1000)
    assert coverage.fraction == 0.7
    assert coverage.floating == (("e.1.up", 100, "K=7 is not a multiple"),
                                 ("lm_head", 200, "output head"))
    assert "; matmul weights quantized: 70.0% (700 of 1,000 elements)" in str(
        report(model)).splitlines()[-1]
