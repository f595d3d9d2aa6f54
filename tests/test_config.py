"""Configuration loading, validation and environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from resizer.cli import main
from resizer.config import load_config, parse_duration, parse_size
from resizer.errors import ConfigError
from resizer.units import DAYS, MINUTES, MiB


def test_embedded_default_serves_media_folder_with_disk_cache() -> None:
    """Without a file: 127.0.0.1:8080, /videos/<path> -> ./media, disk cache."""
    config = load_config(env={})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.cache.backend == "disk"
    assert config.cache.path == ".cache/resizer"
    (origin,) = config.origins
    assert origin.matcher == "^/videos/(?P<path>.+)$"
    assert origin.sources[0].root == "./media"


def test_every_problem_is_reported_with_its_key() -> None:
    """Unknown keys, bad types and bad regexes are all listed, each with its key."""
    text = """
    [server]
    port = "x"
    colour = "blue"
    [cache]
    ttl = "3 fortnights"
    [nonsense]
    [[origins]]
    name = "a"
    matcher = "("
    [[origins.sources]]
    type = "ftp"
    """
    with pytest.raises(ConfigError) as info:
        load_config(text=text, env={})
    keys = {key for key, _ in info.value.problems}
    assert {
        "server.port",
        "server.colour",
        "cache.ttl",
        "nonsense",
        "origins[0].matcher",
        "origins[0].sources[0].type",
    } <= keys


def test_environment_overrides_scalars() -> None:
    """RESIZER_<SECTION>_<KEY> overrides a key; RESIZER_FFMPEG selects ffmpeg."""
    env = {"RESIZER_SERVER_PORT": "9001", "RESIZER_CACHE_TTL": "2d", "RESIZER_FFMPEG": "/x/ff"}
    config = load_config(env=env)
    assert config.server.port == 9001
    assert config.cache.ttl == 2 * DAYS
    assert config.transform.ffmpeg == "/x/ff"


def test_bad_environment_value_names_the_variable() -> None:
    """A bad override is reported with the variable it came from."""
    with pytest.raises(ConfigError, match=r"RESIZER_SERVER_PORT"):
        load_config(env={"RESIZER_SERVER_PORT": "eighty"})


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    """A config file's relative paths are relative to its folder."""
    file = tmp_path / "conf" / "resizer.toml"
    file.parent.mkdir()
    file.write_text(
        '[[origins]]\nname = "v"\nmatcher = "^/(.+)$"\n'
        '[[origins.sources]]\ntype = "filesystem"\nroot = "media"\npath = "$1"\n'
    )
    config = load_config(file, env={})
    assert config.resolve_path(config.origins[0].sources[0].root) == file.parent / "media"


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [(30, 30.0), ("30s", 30.0), ("5m", 5 * MINUTES), ("1d", DAYS), ("250ms", 0.25)],
)
def test_durations_carry_units(raw: object, seconds: float) -> None:
    """Durations accept a bare number of seconds or a unit suffix."""
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize(("raw", "size"), [(1024, 1024), ("256MiB", 256 * MiB), ("1.5KiB", 1536)])
def test_sizes_carry_units(raw: object, size: int) -> None:
    """Sizes accept a bare number of bytes or a binary/decimal unit."""
    assert parse_size(raw) == size


def test_check_config_prints_each_error_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resizer check-config` lists each problem with its key and exits 1."""
    file = tmp_path / "bad.toml"
    file.write_text("[server]\nport = 99999\nbogus = 1\n")
    assert main(["check-config", str(file)]) == 1
    err = capsys.readouterr().err
    assert "server.port" in err
    assert "server.bogus" in err


def test_check_config_accepts_a_valid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid file passes check-config with exit code 0."""
    file = tmp_path / "good.toml"
    file.write_text(
        '[server]\nport = 9000\n[[origins]]\nname = "v"\nmatcher = "^/v/(?P<path>.+)$"\n'
        '[[origins.sources]]\ntype = "filesystem"\nroot = "/srv/media"\n'
    )
    assert main(["check-config", str(file)]) == 0
    assert "ok" in capsys.readouterr().out


def test_shipped_example_configuration_is_valid() -> None:
    """deploy/resizer.example.toml passes check-config, so the documented example works."""
    example = Path(__file__).parent.parent / "deploy" / "resizer.example.toml"
    assert main(["check-config", str(example)]) == 0


def test_readme_configuration_reference_is_valid() -> None:
    """The README's reference block (every key, http and s3 sources) loads without errors."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.index("## Configuration reference")
    start = readme.index("```toml", section) + len("```toml")
    block = readme[start : readme.index("```", start)]
    config = load_config(text=block, env={"MEDIA_TOKEN": "token"})
    assert [source.type for source in config.origins[0].sources] == ["filesystem", "http", "s3"]
    assert config.origins[0].ttl["client_error"] == 60.0


def test_source_tables_are_checked_by_type() -> None:
    """Missing per-type keys, bad auth and bad TTL classes are reported with their keys."""
    text = """
    [[origins]]
    name = "o"
    matcher = "^/(?P<path>.+)$"
    ttl = { ok = "1h", sometimes = 5 }
    [[origins.sources]]
    type = "http"
    auth = { type = "bearer" }
    [[origins.sources]]
    type = "s3"
    failure_threshold = -1
    """
    with pytest.raises(ConfigError) as caught:
        load_config(text=text, env={})
    keys = {key for key, _ in caught.value.problems}
    assert {
        "origins[0].ttl.sometimes",
        "origins[0].sources[0].base_url",
        "origins[0].sources[0].auth.env",
        "origins[0].sources[1].bucket",
        "origins[0].sources[1].failure_threshold",
    } <= keys


def test_source_idle_timeout_carries_units_and_must_be_positive() -> None:
    """A source's idle_timeout takes a duration (default 30 s); zero or a non-duration is
    reported with its key."""
    table = '[[origins]]\nname = "o"\nmatcher = "^/(?P<path>.+)$"\n'
    http = '[[origins.sources]]\ntype = "http"\nbase_url = "https://cdn.example.com/"\n'
    config = load_config(text=table + http + 'idle_timeout = "2m"\n' + http, env={})
    assert [source.idle_timeout for source in config.origins[0].sources] == [2 * MINUTES, 30.0]
    with pytest.raises(ConfigError) as caught:
        load_config(text=table + http + "idle_timeout = 0\n" + http + 'idle_timeout = "x"', env={})
    keys = {key for key, _ in caught.value.problems}
    assert keys == {"origins[0].sources[0].idle_timeout", "origins[0].sources[1].idle_timeout"}


def test_scheduling_rules_are_checked() -> None:
    """[scheduling]: unknown kinds of run, a kind in two classes and negative bounds are
    each reported; the defaults resolve to one slot per CPU and all-but-one per source."""
    from resizer.scheduling.queue import Priority
    from resizer.scheduling.rules import classes_from_config, rules_from_config

    base = '[[origins]]\nname = "v"\nmatcher = "^/v/(?P<path>.+)$"\n'
    base += '[[origins.sources]]\ntype = "filesystem"\nroot = "."\n'
    bad = '[scheduling]\nhigh = ["frame", "thumbnails"]\nlow = ["frame"]\nmax_queue = -1\n'
    with pytest.raises(ConfigError) as caught:
        load_config(text=base + bad, env={})
    problems = caught.value.problems
    assert [key for key, _ in problems] == ["scheduling", "scheduling", "scheduling.max_queue"]
    assert "thumbnails" in problems[0][1]
    config = load_config(text=base + "[limits]\nmax_concurrent_transforms = 4\n", env={})
    rules = rules_from_config(config)
    assert (rules.slots, rules.max_per_source, rules.max_per_client) == (4, 3, 0)
    classes = classes_from_config(config)
    assert [classes.of(k) for k in ("probe", "video", "prefetch")] == list(Priority)
