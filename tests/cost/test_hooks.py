"""pytrain.cost.hooks: each DDP comm hook's predicted step over a link of a given rate, and ``pytrain plan --link``."""
import pytest

from pytrain.cost.collectives import Link, format_rate, parse_rate
from pytrain.cost.ddp import ddp_step
from pytrain.cost.hooks import CODEC_S_PER_PARAM, LINK_HOST_S_PER_BYTE, compression_ratio, hook_steps, link_for_rate
from pytrain.cost.cli import main


@pytest.mark.parametrize("hook, width, ratio", [("plain", 64, 1.0), ("powersgd_r4", 2048, 8 / 2048),
                                                ("powersgd_r8", 8, 1.0), ("topk_1%", 64, 0.02),
                                                ("topk_0.1%", 64, 0.002), ("int8", 64, (1 + 4 / 256) / 4)])
def test_compression_ratio(hook, width, ratio):
    assert compression_ratio(hook, width) == pytest.approx(ratio)


def test_unknown_hook():
    with pytest.raises(ValueError, match="unknown hook 'zip'"):
        compression_ratio("zip", 64)


def test_link_for_rate_is_the_rate_in_bytes():
    link = link_for_rate(1e9, efficiency=0.5, alpha_s=1e-3)
    assert link.alpha == 1e-3 and link.beta == pytest.approx(8 / 0.5e9)


def test_hook_steps_follow_ddp_step_and_rank_fastest_first():
    link = Link(1e-4, 8e-9)
    codecs = {"powersgd_r4": 1e-9, "int8": 2e-8, "topk_1%": 5e-9}
    est = hook_steps(25_000_000, 2048, 0.1, link, 2, codecs)
    assert [e.step_s for e in est] == sorted(e.step_s for e in est)
    by = {e.hook: e for e in est}
    assert set(by) == {"plain", *codecs}
    for hook, e in by.items():
        want = ddp_step(25_000_000, compute_s=0.1, world_size=2, link=link,
                        compression_ratio=compression_ratio(hook, 2048), codec_s=codecs.get(hook, 0.0) * 25e6,
                        host_s_per_byte=LINK_HOST_S_PER_BYTE)
        assert e.step_s == pytest.approx(want.step_s)
    assert est[0].hook == "powersgd_r4"  # slow link, cheap codec: the most compressed wins
    fast = hook_steps(25_000_000, 2048, 0.1, Link(1e-6, 1e-12), 2, codecs, host_s_per_byte=0.0)
    assert fast[0].hook == "plain"  # nearly free link, moved by a NIC: any codec time loses


def test_rates_round_trip():
    assert parse_rate("0.5gbit") == 5e8 and format_rate(parse_rate("10gbit")) == "10gbit"


def test_plan_link_recommends_and_lists_every_hook(capsys):
    assert main(["--link", "1gbit", "--params", "25e6", "--hidden", "2048", "--compute-s", "0.05"],
                command="plan") == 0
    out = capsys.readouterr().out
    assert "recommended:" in out and "1gbit link" in out
    for hook in ["plain", *CODEC_S_PER_PARAM]:
        assert f"| {hook} |" in out


def test_plan_link_rejects_a_bad_rate(capsys):
    assert main(["--link", "fast"], command="plan") == 2
    assert "link rate 'fast'" in capsys.readouterr().out
