"""hpcjobs.hostspec: DeepSpeed's hostfile and --include/--exclude grammar.

The unit tests are pure (no torch/deepspeed). ``TestAgainstDeepSpeed`` (marked
``train``) runs DeepSpeed's own parser on generated inputs and requires the same
result, or both to fail, except where hpcjobs is documented to be stricter.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from hpcjobs.errors import ConfigError
from hpcjobs.hostspec import (
    SlurmRequest,
    filter_resources,
    format_hostfile,
    format_spec,
    parse_hostfile,
    parse_spec,
    read_hostfile,
    slurm_request_from_spec,
    world_size,
)

POOL = {"node1": 4, "node2": 4}


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_module_imports_without_deepspeed_or_torch():
    code = (
        "import sys, hpcjobs.hostspec, hpcjobs.dsconfig; "
        "bad = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- hostfile


class TestParseHostfile:
    def test_hosts_in_file_order(self):
        text = "node2 slots=8\nnode1 slots=4\nnode3 slots=2\n"
        pool = parse_hostfile(text)
        assert pool == {"node2": 8, "node1": 4, "node3": 2}
        assert list(pool) == ["node2", "node1", "node3"]

    def test_comments_blank_lines_and_blanks_are_ignored(self):
        text = (
            "# cluster A\n\n   \n  node1\tslots=8  \n\t# indented comment\nnode2   slots=8 # rack 2\nnode3 slots=2#x\n"
        )
        assert parse_hostfile(text) == {"node1": 8, "node2": 8, "node3": 2}

    def test_crlf_and_cr_line_ends(self):
        assert parse_hostfile("node1 slots=1\r\nnode2 slots=2\rnode3 slots=3") == {"node1": 1, "node2": 2, "node3": 3}

    def test_leading_zeros(self):
        assert parse_hostfile("node1 slots=08") == {"node1": 8}

    def test_no_trailing_newline_and_ip_addresses(self):
        assert parse_hostfile("10.0.0.1 slots=4") == {"10.0.0.1": 4}

    def test_error_names_source_and_line(self):
        msg = error(parse_hostfile, "node1 slots=8\n\n# c\nnode2\n", source="hosts.txt")
        assert msg.startswith("hosts.txt:4: ")
        assert "'node2' has no slot count" in msg and "node2 slots=N" in msg

    @pytest.mark.parametrize(
        "line, expected",
        [
            ("node1 slots=four", "bad slot count 'slots=four' for host node1"),
            ("node1 slots=", "bad slot count 'slots='"),
            ("node1 slots=-1", "bad slot count 'slots=-1'"),
            ("node1 slots=4x", "bad slot count 'slots=4x'"),
            ("node1 slots=\u0664", "bad slot count"),  # Arabic-Indic 4: DeepSpeed's \d takes it
            ("node1 slots = 4", "no blanks around '='"),
            ("node1 slots= 4", "no blanks allowed around '='"),
            ("node1 Slots=4", "'slots=' must be lower case"),
            ("node1slots=4", "put a blank between the host and 'slots='"),
            ("node1 gpus=4", "expected 'HOST slots=N'"),
            ("node1 slots=0", "host node1 has slots=0"),
            ("node1 slots=4 node2 slots=4", "unexpected text after 'node1 slots=4': 'node2 slots=4'"),
            ("node1 slots=4 max_slots=8", "unexpected text after"),
        ],
    )
    def test_bad_lines(self, line, expected):
        msg = error(parse_hostfile, f"node0 slots=1\n{line}\n", source="hf")
        assert msg.startswith("hf:2: ")
        assert expected in msg

    @pytest.mark.parametrize("host", ["node:1", "node@1", "node,1"])
    def test_host_names_the_spec_grammar_cannot_name(self, host):
        msg = error(parse_hostfile, f"{host} slots=2", source="hf")
        assert msg.startswith("hf:1: ") and "separator" in msg and repr(host) in msg

    def test_duplicate_host_names_both_lines(self):
        msg = error(parse_hostfile, "node1 slots=8\nnode2 slots=8\nnode1 slots=4\n", source="hf")
        assert msg.startswith("hf:3: ")
        assert "host node1 is listed twice (first on line 1)" in msg

    @pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  # another\n"])
    def test_no_hosts(self, text):
        msg = error(parse_hostfile, text, source="hf")
        assert msg.startswith("hf: ") and "lists no hosts" in msg


class TestReadHostfile:
    def test_reads_file(self, tmp_path):
        path = tmp_path / "hostfile"
        path.write_text("node1 slots=8\nnode2 slots=8\n")
        assert read_hostfile(path) == {"node1": 8, "node2": 8}

    def test_error_names_path_and_line(self, tmp_path):
        path = tmp_path / "hostfile"
        path.write_text("node1 slots=8\nnode2 slots=x\n")
        assert error(read_hostfile, path).startswith(f"{path}:2: ")

    def test_missing_file(self, tmp_path):
        path = tmp_path / "nope"
        assert error(read_hostfile, path) == f"{path}: hostfile not found"

    def test_directory(self, tmp_path):
        assert "is a directory" in error(read_hostfile, tmp_path)

    def test_not_utf8(self, tmp_path):
        path = tmp_path / "hostfile"
        path.write_bytes(b"node\xff slots=1\n")
        assert "not UTF-8" in error(read_hostfile, path)


def test_format_hostfile_round_trip():
    pool = {"node2": 8, "node1": 4}
    text = format_hostfile(pool)
    assert text == "node2 slots=8\nnode1 slots=4\n"
    assert list(parse_hostfile(text).items()) == list(pool.items())


@pytest.mark.parametrize("pool", [{"a b": 1}, {"a:b": 1}, {"a": 0}, {"a": True}, {"": 1}])
def test_format_hostfile_refuses_what_it_cannot_write(pool):
    with pytest.raises(ValueError):
        format_hostfile(pool)


# --------------------------------------------------------------------------- spec syntax


class TestParseSpec:
    def test_whole_hosts_and_slots(self):
        assert parse_spec("node1@node2:0,1") == {"node1": None, "node2": [0, 1]}

    def test_slots_are_sorted_hosts_keep_spec_order(self):
        spec = parse_spec("node2:3,1,2@node1")
        assert list(spec) == ["node2", "node1"]
        assert spec["node2"] == [1, 2, 3]

    def test_blanks_around_slot_numbers(self):
        # DeepSpeed's int() strips them, so "node1:0, 1" works there too.
        assert parse_spec("node1: 0 , 1") == {"node1": [0, 1]}

    def test_empty(self):
        assert parse_spec("") == {}

    @pytest.mark.parametrize(
        "spec, part",
        [
            ("@node1", "empty entry"),
            ("node1@", "empty entry"),
            ("node1@@node2", "empty entry"),
            ("node1:0:1", "entry 'node1:0:1' has more than one ':'"),
            (":0", "entry ':0' has no host name before ':'"),
            ("node1:", "entry 'node1:' has an empty slot number"),
            ("node1:0,,1", "entry 'node1:0,,1' has an empty slot number"),
            ("node1:x", "slot 'x' is not a GPU index"),
            ("node1:+1", "slot '+1' is not a GPU index"),
            ("node1:-1", "slot '-1' is not a GPU index"),
            ("node1:1_0", "slot '1_0' is not a GPU index"),
            ("node1:\u0663", "is not a GPU index"),
            ("node1:0,0", "entry 'node1:0,0' names slot 0 twice"),
            ("node1:1,01", "names slot 1 twice"),
            ("node1 @node2", "host name 'node1 ' contains blanks"),
        ],
    )
    def test_syntax_errors_quote_spec_and_entry(self, spec, part):
        msg = error(parse_spec, spec, source="--include")
        assert msg.startswith(f"--include {spec!r}: ")
        assert part in msg

    def test_comma_between_hosts_suggests_at(self):
        msg = error(parse_spec, "node1,node2", source="--exclude")
        assert "separate hosts with '@' (e.g. 'node1@node2')" in msg

    def test_duplicate_host_is_rejected_naming_both_entries(self):
        msg = error(parse_spec, "node1@node2@node1:0")
        assert "host node1 appears twice ('node1' and 'node1:0')" in msg


# --------------------------------------------------------------------------- filtering


class TestFilterResources:
    def test_no_filter_is_every_slot(self):
        assert filter_resources(POOL) == {"node1": [0, 1, 2, 3], "node2": [0, 1, 2, 3]}
        assert filter_resources(POOL, None, None) == filter_resources(POOL)

    def test_include_whole_host_and_slots(self):
        assert filter_resources(POOL, include="node1@node2:0,2") == {"node1": [0, 1, 2, 3], "node2": [0, 2]}

    def test_include_follows_pool_order_not_spec_order(self):
        active = filter_resources(POOL, include="node2:1@node1:3,0")
        assert list(active.items()) == [("node1", [0, 3]), ("node2", [1])]

    def test_exclude_slots(self):
        assert filter_resources(POOL, exclude="node2:1,3") == {"node1": [0, 1, 2, 3], "node2": [0, 2]}

    def test_exclude_whole_host(self):
        assert filter_resources(POOL, exclude="node1") == {"node2": [0, 1, 2, 3]}

    def test_exclude_every_slot_of_a_host_drops_it(self):
        assert filter_resources(POOL, exclude="node1:0,1,2,3") == {"node2": [0, 1, 2, 3]}

    def test_exclude_everything_is_an_error(self):
        msg = error(filter_resources, POOL, exclude="node1@node2:0,1,2,3")
        assert "excludes every GPU in the hostfile" in msg

    def test_include_and_exclude_together(self):
        msg = error(filter_resources, POOL, include="node1", exclude="node2:0")
        assert "--include 'node1' and --exclude 'node2:0' cannot be used together" in msg

    def test_unknown_host(self):
        msg = error(filter_resources, POOL, include="node3:0")
        assert msg == "--include 'node3:0': host node3 is not in the hostfile (hosts: node1, node2)"

    def test_unknown_host_in_exclude_and_custom_labels(self):
        msg = error(
            filter_resources,
            POOL,
            exclude="node1@gpu7",
            source_exclude="recipe.yaml: exclude",
            pool_name="the Slurm allocation",
        )
        assert msg == "recipe.yaml: exclude 'gpu7': host gpu7 is not in the Slurm allocation (hosts: node1, node2)"

    def test_slot_not_on_host(self):
        msg = error(filter_resources, POOL, include="node1@node2:2,4,5")
        assert (
            msg == "--include 'node2:2,4,5': host node2 has no slots 4, 5 (it has slots 0-3: slots=4 in the hostfile)"
        )

    def test_slot_not_on_one_gpu_host(self):
        msg = error(filter_resources, {"a": 1}, exclude="a:1")
        assert "host a has no slot 1 (it has slot 0" in msg

    def test_long_host_lists_are_shortened(self):
        pool = {f"n{i:02d}": 8 for i in range(40)}
        msg = error(filter_resources, pool, include="x")
        assert "n00, n01," in msg and "n39" not in msg and "(40 hosts)" in msg

    def test_slurm_hostlist_gets_a_hint(self):
        msg = error(filter_resources, POOL, include="node[1-2]")
        assert "not Slurm hostlist expressions" in msg

    def test_syntax_errors_propagate(self):
        assert "names slot 0 twice" in error(filter_resources, POOL, include="node1:0,0")

    @pytest.mark.parametrize("pool", [{"a": 0}, {"a": -1}, {"a": True}, {"a": "8"}])
    def test_bad_pool(self, pool):
        assert "GPU slots" in error(filter_resources, pool)


def test_world_size():
    assert world_size(filter_resources({"n1": 8, "n2": 8})) == 16
    assert world_size(filter_resources(POOL, exclude="node2:0")) == 7
    assert world_size({}) == 0


class TestFormatSpec:
    def test_explicit_slots(self):
        assert format_spec({"node1": [0, 1], "node2": [3]}) == "node1:0,1@node2:3"

    def test_none_is_whole_host_and_pool_compresses(self):
        assert format_spec({"node1": None, "node2": [0, 1, 2, 3]}, pool=POOL) == "node1@node2"
        assert format_spec({"node2": [0, 1, 2]}, pool=POOL) == "node2:0,1,2"

    @pytest.mark.parametrize("spec", ["node1", "node2:0,3@node1", "node1:1"])
    def test_round_trips(self, spec):
        assert format_spec(parse_spec(spec)) == spec
        active = filter_resources(POOL, include=spec)
        assert filter_resources(POOL, include=format_spec(active)) == active
        assert filter_resources(POOL, include=format_spec(active, pool=POOL)) == active

    @pytest.mark.parametrize("active", [{"a": []}, {"a@b": [0]}, {"a b": None}])
    def test_refuses_what_it_cannot_write(self, active):
        with pytest.raises(ValueError):
            format_spec(active)


# --------------------------------------------------------------------------- Slurm request


class TestSlurmRequest:
    def test_no_spec_uses_default(self):
        assert slurm_request_from_spec("", "", 8) == SlurmRequest(None, 8, [])
        assert slurm_request_from_spec(None, None, 4) == (None, 4, [])

    def test_include_slots_sets_gpus_per_node_to_max_slot_plus_one(self):
        nodelist, gpus, excluded = slurm_request_from_spec("node1:0,1@node2:0,1", "", 8)
        assert (nodelist, gpus, excluded) == (["node1", "node2"], 2, [])

    def test_high_slot_needs_gpus_below_it(self):
        assert slurm_request_from_spec("node1:6,7", "", 8).gpus_per_node == 8
        assert slurm_request_from_spec("node1:0@node2:2", "", 8).gpus_per_node == 3

    def test_bare_host_needs_the_default(self):
        assert slurm_request_from_spec("node1@node2:0", "", 8) == SlurmRequest(["node1", "node2"], 8, [])

    def test_slots_beyond_the_default_raise_the_count(self):
        assert slurm_request_from_spec("node1@node2:0,5", "", 4).gpus_per_node == 6

    def test_nodelist_keeps_spec_order(self):
        assert slurm_request_from_spec("b@a", "", 1).nodelist == ["b", "a"]

    def test_include_beyond_node_size(self):
        msg = error(slurm_request_from_spec, "node1:8", "", 8, max_gpus_per_node=8)
        assert msg == "--include 'node1:8': slot 8 does not exist on a node with 8 GPUs (slots 0-7)"

    def test_exclude_whole_hosts_become_slurm_excludes(self):
        assert slurm_request_from_spec("", "node3@node4", 8) == SlurmRequest(None, 8, ["node3", "node4"])

    def test_exclude_slots_keeps_default(self):
        assert slurm_request_from_spec("", "node1:0", 8) == SlurmRequest(None, 8, [])

    def test_exclude_every_default_slot_excludes_the_node(self):
        assert slurm_request_from_spec("", "node1:0,1@node2:1", 2) == SlurmRequest(None, 2, ["node1"])

    def test_exclude_slot_beyond_default(self):
        msg = error(slurm_request_from_spec, "", "node1:8", 8)
        assert msg == "--exclude 'node1:8': nodes get 8 GPUs (slots 0-7), so there is no slot 8 to exclude"

    def test_both_specs(self):
        assert "cannot be used together" in error(slurm_request_from_spec, "a", "b", 8)

    def test_hostlist_expression(self):
        msg = error(slurm_request_from_spec, "node[1-4]", "", 8)
        assert "looks like a Slurm hostlist expression" in msg and "node1@node2@node3" in msg

    def test_syntax_errors(self):
        assert "appears twice" in error(slurm_request_from_spec, "", "a@a:1", 8)

    @pytest.mark.parametrize(
        "kwargs", [{"gpus_per_node_default": 0}, {"gpus_per_node_default": 8, "max_gpus_per_node": 0}]
    )
    def test_bad_counts(self, kwargs):
        assert "positive integer" in error(slurm_request_from_spec, "a", "", **kwargs)


# --------------------------------------------------------------------------- DeepSpeed itself


_HOST_LINE_DS = re.compile(r"^(\S+)\s+slots=(\d+)")  # DeepSpeed's pattern, for the divergence oracle


def _hostfile_stricter(text: str) -> bool:
    """True when hpcjobs documents rejecting a hostfile that DeepSpeed accepts."""
    for raw in io.StringIO(text, newline=None).readlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _HOST_LINE_DS.search(line)
        host, digits, rest = m.group(1), m.group(2), line[m.end() :]
        if not digits.isascii() or int(digits) == 0 or any(c in host for c in "@:,"):
            return True
        if rest and not (rest[0].isspace() or rest[0] == "#"):
            return True
        if rest.strip() and not rest.strip().startswith("#"):
            return True
    return False


def _spec_stricter(spec: str, ds_result: dict) -> bool:
    """True when hpcjobs documents rejecting a spec (already accepted by DeepSpeed)."""
    if not ds_result:
        return True  # everything excluded
    seen: set[str] = set()
    for part in spec.split("@") if spec else []:
        host, colon, slots = part.partition(":")
        if host in seen:
            return True
        seen.add(host)
        if colon:
            items = [s.strip() for s in slots.split(",")]
            if any(not (s.isascii() and s.isdigit()) for s in items):
                return True
            if len({int(s) for s in items}) != len(items):
                return True
    return False


@pytest.fixture(scope="module")
def runner():
    return pytest.importorskip("deepspeed.launcher.runner")


def _strategies():
    """Input generators, mostly valid with a share of the mistakes users make."""
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    def mostly(draw, valid, junk, junk_percent):
        return draw(junk) if draw(st.integers(0, 99)) < junk_percent else draw(valid)

    @st.composite
    def hostfile_line(draw):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            return draw(st.sampled_from(["", "   ", "# comment", "  # c", "#", "\u2028", "node1"]))
        blank = st.sampled_from(["", " ", "  ", "\t", "\u00a0", "\x0c", " \t "])
        host = mostly(
            draw,
            st.sampled_from(["node1", "node2", "n3", "10.0.0.4", "w-5"]),
            st.sampled_from(["n:5", "n@6", "a,b", "#x", "slots=1", "\u00e9", ""]),
            15,
        )
        sep = mostly(draw, st.sampled_from([" ", "\t", "  "]), blank, 15)
        key = mostly(draw, st.just("slots="), st.sampled_from(["Slots=", "slots =", "slots= ", "gpus=", ""]), 10)
        number = mostly(
            draw,
            st.sampled_from(["1", "2", "4", "8", "08", "16"]),
            st.sampled_from(["0", "\u0663", "1\u0663", "x", "", "-1", "4x"]),
            15,
        )
        trailer = mostly(
            draw,
            st.sampled_from(["", "", " # c", "#c", "\t"]),
            st.sampled_from(["x", " extra", " slots=2", " node2 slots=2"]),
            15,
        )
        return draw(blank) + host + sep + key + number + trailer + draw(blank)

    hostfile_text = st.one_of(
        st.tuples(st.lists(hostfile_line(), max_size=6), st.sampled_from(["\n", "\r\n", "\r"])).map(
            lambda t: t[1].join(t[0])
        ),
        st.text(alphabet="ns12= \t\n#lotx:\r0", max_size=40),
    )

    @st.composite
    def filter_case(draw):
        names = list(draw(st.permutations(["n1", "n2", "n3", "n4"])))[: draw(st.integers(1, 4))]
        pool = {h: draw(st.integers(1, 4)) for h in names}

        def entry(host):
            if draw(st.integers(0, 99)) < 10:
                host = draw(st.sampled_from(["n5", "", "n1 ", "n1,n2", "n1:0:1"]))
            if draw(st.booleans()):
                return host
            top = pool.get(host, 4)
            slot = st.builds(
                lambda n, pad: pad.replace("N", str(n)),
                st.integers(0, top - 1),
                st.sampled_from(["N"] * 8 + [" N", "N "]),
            )
            slots = draw(st.lists(slot, min_size=1, max_size=top))
            if draw(st.integers(0, 99)) < 20:
                junk = st.sampled_from([str(top), "7", "+1", "-1", "01", "x", "", "\u0661", "1_0"])
                slots.insert(draw(st.integers(0, len(slots))), draw(junk))
            return host + ":" + ",".join(slots)

        def spec():
            if draw(st.integers(0, 9)) == 0:
                return ""
            hosts = list(draw(st.permutations(names)))[: draw(st.integers(1, len(names)))]
            if draw(st.integers(0, 99)) < 10:  # a host named twice
                hosts.insert(draw(st.integers(0, len(hosts))), draw(st.sampled_from(names)))
            return "@".join(entry(h) for h in hosts)

        mode = draw(st.sampled_from(["include"] * 4 + ["exclude"] * 4 + ["both", "none"]))
        include = spec() if mode in ("include", "both") else ""
        exclude = spec() if mode in ("exclude", "both") else ""
        return pool, include, exclude

    return hyp, hostfile_text, filter_case()


@pytest.mark.train
class TestAgainstDeepSpeed:
    """Same answer as deepspeed.launcher.runner, or both fail (generated inputs).

    Where DeepSpeed accepts an input that hpcjobs documents rejecting (see the
    hostspec module docstring), an independent oracle below must say so; every
    other accepted input must give the same hosts, slots and order.
    """

    def test_hostfile(self, runner):
        hyp, texts, _ = _strategies()
        counts = {"both fail": 0, "same": 0, "stricter": 0}

        @hyp.settings(max_examples=2000, deadline=None, database=None, derandomize=True)
        @hyp.given(texts)
        def check(text):
            try:
                expected = dict(runner._parse_hostfile(io.StringIO(text, newline=None).readlines()))
            except ValueError:
                expected = None
            try:
                got = parse_hostfile(text)
            except ConfigError:
                got = None
            if expected is None:
                assert got is None, f"DeepSpeed rejects {text!r}, hpcjobs gives {got}"
                counts["both fail"] += 1
            elif _hostfile_stricter(text):
                assert got is None, f"hpcjobs should reject {text!r} (documented divergence)"
                counts["stricter"] += 1
            else:
                assert got is not None, f"DeepSpeed accepts {text!r}: {expected}"
                assert list(got.items()) == list(expected.items())
                counts["same"] += 1

        check()
        assert min(counts.values()) > 100, counts  # every branch was exercised

    def test_filter(self, runner):
        hyp, _, cases = _strategies()
        counts = {"both fail": 0, "same": 0, "stricter": 0, "reordered": 0}

        @hyp.settings(max_examples=2500, deadline=None, database=None, derandomize=True)
        @hyp.given(cases)
        def check(case):
            pool, include, exclude = case
            try:
                expected = runner.parse_inclusion_exclusion(dict(pool), include, exclude)
            except ValueError:
                expected = None
            try:
                got = filter_resources(pool, include, exclude)
            except ConfigError:
                got = None
            where = f"pool={pool} include={include!r} exclude={exclude!r}"
            if expected is None:
                assert got is None, f"DeepSpeed rejects {where}, hpcjobs gives {got}"
                counts["both fail"] += 1
            elif _spec_stricter(include or exclude, expected):
                assert got is None, f"hpcjobs should reject {where} (documented divergence)"
                counts["stricter"] += 1
            else:
                assert got is not None, f"DeepSpeed accepts {where}: {dict(expected)}"
                assert list(got.items()) == list(expected.items()), where
                counts["same"] += 1
                if include and list(parse_spec(include)) != list(got):
                    counts["reordered"] += 1

        check()
        # every branch exercised, and enough includes whose order differs from the pool's
        assert min(counts.values()) > 30 and counts["same"] > 300, counts

    def test_read_hostfile_matches_fetch_hostfile(self, runner, tmp_path):
        path = tmp_path / "hostfile"
        path.write_text("# a\r\nworker-1 slots=8\r\n\r\n  worker-0\tslots=4 # x\rworker-2 slots=2")
        assert list(read_hostfile(path).items()) == list(runner.fetch_hostfile(str(path)).items())
