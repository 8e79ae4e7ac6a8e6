"""The documentation against the sources, so that it cannot drift. No database, no build: it
parses the SQL scripts, the Rust sources and the Markdown.

- every function, view and table of schema `certyo` (CREATE ... certyo.x in sql/schema.sql,
  sql/delivery.sql, sql/operations.sql, and every `#[pg_extern]` in src/, which lands in schema
  certyo: the control file's `schema`) has an entry in docs/reference.md: a heading or a table
  row (first cell) that names it;
- every `certyo.*` setting (the GucRegistry::define_* calls in src/) has a row in the settings
  table of docs/reference.md;
- every `certyo-relay` command, option and environment variable (clap in relay/src/main.rs),
  every key of its configuration file (the serde structs of relay/src/config.rs) and every
  metric it serves (relay/src/metrics.rs) is in docs/relay.md;
- every path CONTRIBUTING.md's Layout names exists, and every file under src/, relay/src and
  certyo/src, and every other file of the repository (git ls-files), is named there;
- README.md is shorter than 250 lines;
- no user-facing document names an internal issue number (outside code and URLs);
- every relative link between the documents leads to a file, and to a heading, that exist.

Run: python3 -m pytest -q -p no:cacheprovider pg_test/test_docs.py"""
import fnmatch
import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SQL_FILES = ["sql/schema.sql", "sql/delivery.sql", "sql/operations.sql"]


@pytest.fixture(autouse=True)
def watch():
    """No cluster here: replaces conftest.py's autouse fixture, which watches one."""
    yield None


USER_DOCS = ["README.md", "CONTRIBUTING.md", "bench/README.md"] + sorted(
    str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))


def read(path):
    return (REPO / path).read_text(encoding="utf-8")


def strip_rust_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def sql_objects():
    """certyo.name of every function, procedure, view, table, sequence and type the scripts create."""
    found = set()
    create = re.compile(
        r"\bCREATE\s+(?:OR\s+REPLACE\s+)?(?:UNLOGGED\s+)?"
        r"(FUNCTION|PROCEDURE|VIEW|MATERIALIZED\s+VIEW|TABLE|SEQUENCE|TYPE)\s+"
        r"(?:IF\s+NOT\s+EXISTS\s+)?certyo\.\"?(\w+)\"?", re.I)
    for path in SQL_FILES:
        text = re.sub(r"--[^\n]*", "", read(path))
        found |= {name for _, name in create.findall(text)}
    return found


def rust_sql_functions():
    """The SQL name of every #[pg_extern] / #[pg_trigger] function in src/ (tests excluded), all of
    which land in schema certyo (certyo_cdc.control: schema = certyo), unless one names another
    schema."""
    found = set()
    attribute = re.compile(
        r"#\[(pg_extern|pg_trigger)(?:\((?P<args>[^\]]*)\))?\]\s*"
        r"(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?(?:unsafe\s+)?(?:extern\s+\"[^\"]*\"\s+)?"
        r"fn\s+(?P<fn>\w+)")
    for path in sorted((REPO / "src").rglob("*.rs")):
        if "tests" in path.relative_to(REPO / "src").parts:
            continue
        text = strip_rust_comments(path.read_text(encoding="utf-8"))
        if "#[pg_schema]" in text:
            raise AssertionError(f"{path}: #[pg_schema] modules are not understood by this test yet")
        for m in attribute.finditer(text):
            args = m.group("args") or ""
            schema = re.search(r"\bschema\s*=\s*\"(\w+)\"", args)
            if schema and schema.group(1) != "certyo":
                continue
            name = re.search(r"\bname\s*=\s*\"(\w+)\"", args)
            found.add(name.group(1) if name else m.group("fn"))
    return found


def settings():
    found = set()
    for path in sorted((REPO / "src").rglob("*.rs")):
        text = strip_rust_comments(path.read_text(encoding="utf-8"))
        found |= set(re.findall(r"define_\w+_guc\s*\(\s*c?\"(certyo\.\w+)\"", text))
    return found


def test_the_parsers_find_what_is_there():
    """A parser that finds nothing would make every other test pass vacuously."""
    assert {"queue", "track", "status", "worker_status", "receipt"} <= sql_objects()
    assert {"track", "untrack", "backfill", "audit", "wake"} <= rust_sql_functions()
    assert {"certyo.base_url", "certyo.api_key_file", "certyo.enabled"} <= settings()
    assert {"--config", "check", "run", "status", "--json"} <= relay_options()
    assert {"base_url", "tenant_id", "name", "url", "mode"} <= relay_config_keys()
    assert {"certyo_relay_queue_changes", "certyo_relay_batch_duration"} <= relay_metrics()


@pytest.mark.parametrize("name", sorted(sql_objects() | rust_sql_functions()))
def test_every_sql_object_is_in_the_reference(name):
    reference = read("docs/reference.md")
    named = rf"certyo\.{re.escape(name)}\b"
    # An entry: a heading that names it, or a table row whose first cell does.
    heading = re.search(rf"^#+ .*`{named}", reference, re.M)
    row = re.search(rf"^\|[^|\n]*`{named}[^|\n]*\|", reference, re.M)
    assert heading or row, (
        f"certyo.{name} has no entry (a heading, or a table row) in docs/reference.md")


@pytest.mark.parametrize("setting", sorted(settings()))
def test_every_setting_is_in_the_reference(setting):
    reference = read("docs/reference.md")
    assert re.search(rf"^\| `{re.escape(setting)}` \|", reference, re.M), (
        f"{setting} has no row in the settings table of docs/reference.md")


def kebab(name):
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower().replace("_", "-")


def relay_options():
    """Commands, options and environment variables of certyo-relay's command line (clap)."""
    main = strip_rust_comments(read("relay/src/main.rs"))
    config = strip_rust_comments(read("relay/src/config.rs"))
    found = set()
    # #[arg(...)] field: --long, -s, env
    for m in re.finditer(r"#\[arg\((?P<args>[^\]]*)\)\]\s*(?:pub\s+)?(?P<field>\w+)\s*:", main):
        args, field = m.group("args"), m.group("field")
        if re.search(r"\blong\b", args):
            explicit = re.search(r"\blong\s*=\s*\"([\w-]+)\"", args)
            found.add("--" + (explicit.group(1) if explicit else kebab(field)))
        if re.search(r"\bshort\b", args):
            explicit = re.search(r"\bshort\s*=\s*'(\w)'", args)
            found.add("-" + (explicit.group(1) if explicit else field[0]))
        env = re.search(r"\benv\s*=\s*\"(\w+)\"", args)
        if env:
            found.add(env.group(1))
    # subcommands: the variants of the enum that derives Subcommand
    sub = re.search(r"#\[derive\([^)]*\bSubcommand\b[^)]*\)\]\s*(?:pub\s+)?enum\s+\w+\s*\{", main)
    assert sub, "relay/src/main.rs: no Subcommand enum found"
    depth, i = 1, sub.end()
    body_start = i
    while depth:
        depth += {"{": 1, "}": -1}.get(main[i], 0)
        i += 1
    body = main[body_start:i - 1]
    top_level = re.sub(r"\{[^{}]*\}", "", body)
    top_level = re.sub(r"#\[[^\]]*\]", "", top_level)
    for variant in re.findall(r"\b([A-Z]\w*)\b", top_level):
        found.add(kebab(variant))
    # environment variables read directly
    found |= set(re.findall(r"try_from_env\(\s*\"(\w+)\"", main))
    found |= set(re.findall(r"env::var\(\s*\"(\w+)\"", main))
    found |= set(re.findall(r"const\s+\w*VARIABLE\w*\s*:\s*&str\s*=\s*\"(\w+)\"", config))
    return found


def relay_config_keys():
    """The keys of certyo-relay's configuration file: the fields of config.rs's Deserialize structs
    (serde renames applied), including the tables [certyo] and [[source]]."""
    text = strip_rust_comments(read("relay/src/config.rs"))
    found = set()
    structs = re.finditer(
        r"#\[derive\([^)]*\bDeserialize\b[^)]*\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub\s+)?struct\s+\w+\s*\{(?P<body>[^}]*)\}",
        text)
    for s in structs:
        for m in re.finditer(r"(?P<attrs>(?:#\[[^\]]*\]\s*)*)(?:pub\s+)?(?P<field>\w+)\s*:", s.group("body")):
            rename = re.search(r"rename\s*=\s*\"(\w+)\"", m.group("attrs"))
            found.add(rename.group(1) if rename else m.group("field"))
    return found


def relay_metrics():
    """The metrics certyo-relay registers (relay/src/metrics.rs), by the name it registers."""
    return set(re.findall(r'register(?:_with_unit)?\(\s*"(certyo_relay_\w+)"', read("relay/src/metrics.rs")))


@pytest.mark.parametrize("metric", sorted(relay_metrics()))
def test_every_relay_metric_is_in_relay_md(metric):
    # As a scraper sees it: a counter ends in _total, a metric in seconds in _seconds.
    assert re.search(rf"`{metric}(_seconds)?(_total)?[`{{]", read("docs/relay.md")), (
        f"certyo-relay's metric {metric} is not documented (as code) in docs/relay.md")


@pytest.mark.parametrize("option", sorted(relay_options()))
def test_every_relay_option_is_in_relay_md(option):
    relay = read("docs/relay.md")
    code = "\n".join(re.findall(r"```sh\n(.*?)```", relay, re.S) + re.findall(r"`([^`\n]+)`", relay))
    assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", code), (
        f"certyo-relay's {option} is not documented (as code) in docs/relay.md")


@pytest.mark.parametrize("key", sorted(relay_config_keys()))
def test_every_relay_config_key_is_in_relay_md(key):
    relay = read("docs/relay.md")
    toml_blocks = "\n".join(re.findall(r"```toml\n(.*?)```", relay, re.S))
    assert (re.search(rf"^\s*#?\s*{re.escape(key)}\s*=", toml_blocks, re.M)
            or re.search(rf"^\s*\[\[?{re.escape(key)}\]\]?\s*$", toml_blocks, re.M)), (
        f"certyo-relay's configuration key {key!r} is not in a TOML example of docs/relay.md")


# A template the layout names, and the files it stands for.
LAYOUT_PATTERNS = {"sql/certyo_cdc--A--B.sql": "sql/certyo_cdc--*--*.sql"}
LAYOUT_ROOTS = ("src/", "sql/", "relay/", "certyo/", "pg_test/", "bench/", "scripts/", "docker/", "packaging/",
                "docs/", ".ci/")


def layout():
    text = read("CONTRIBUTING.md")
    m = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "CONTRIBUTING.md has no '## Layout' section"
    return m.group(1)


def test_every_path_the_layout_names_exists():
    named = [p for p in re.findall(r"`([^`\s]+)`", layout()) if p.startswith(LAYOUT_ROOTS)]
    assert len(named) > 40, "the layout names almost no paths: did the parser break?"
    missing = []
    for path in named:
        if path in LAYOUT_PATTERNS:
            if not list(REPO.glob(LAYOUT_PATTERNS[path])):
                missing.append(path)
        elif not (REPO / path).exists():
            missing.append(path)
    assert not missing, f"CONTRIBUTING.md's Layout names paths that do not exist: {missing}"


def test_every_source_file_is_in_the_layout():
    named = set(re.findall(r"`([^`\s]+)`", layout()))
    files = sorted(str(p.relative_to(REPO)) for root in ("src", "relay/src", "certyo/src")
                   for p in (REPO / root).rglob("*") if p.is_file())
    assert files
    missing = [f for f in files if f not in named]
    assert not missing, f"CONTRIBUTING.md's Layout does not name: {missing}"


def test_every_file_of_the_repository_is_in_the_layout():
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no list of the repository's files")
    named = set(re.findall(r"`([^`\s]+)`", layout()))
    files = [f for f in listed.stdout.splitlines() if (REPO / f).is_file()]
    assert len(files) > 100, "git lists almost no files: did the listing break?"
    missing = [f for f in files
               if f not in named and not any(fnmatch.fnmatch(f, p) for p in LAYOUT_PATTERNS.values())]
    assert not missing, f"CONTRIBUTING.md's Layout does not name: {missing}"


def test_readme_is_a_front_page():
    lines = read("README.md").count("\n")
    assert lines < 250, f"README.md has {lines} lines; the reference belongs in docs/"


def prose(text):
    """The text outside fenced code blocks, inline code and link targets / URLs."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.sub(r"<?https?://\S+", "", text)


ISSUE_REFERENCE = re.compile(
    r"\b(?:issues?|tickets?|pull requests?|PRs?)\s+#?\d+\b|(?<![\w&/#])#\d+\b", re.I)


@pytest.mark.parametrize("doc", USER_DOCS)
def test_no_internal_issue_numbers(doc):
    hits = [m.group(0) for m in ISSUE_REFERENCE.finditer(prose(read(doc)))]
    assert not hits, f"{doc} names internal issues: {hits}"


def slug(heading):
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_~]", lambda m: "_" if m.group(0) == "_" else "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", USER_DOCS)
def test_relative_links_resolve(doc):
    source = REPO / doc
    text = re.sub(r"^```.*?^```", "", source.read_text(encoding="utf-8"), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (source.parent / path).resolve() if path else source
        if path.startswith("../shared/") and doc == "README.md":
            continue  # the Certyo API description, beside the repository
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert not broken, f"{doc}: broken links {broken}"
