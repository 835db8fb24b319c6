"""MkDocs hook: the committed studies (experiments/<name>/ in the repository) join the site under
studies/<name>/ as they are, so a study page is its README.md itself and its links to report.md and
the plots resolve; no copy that could drift from the repository's files."""

from pathlib import Path

from mkdocs.structure.files import File

KINDS = {".md", ".png", ".txt", ".svg"}


def on_files(files, config):
    experiments = Path(config["config_file_path"]).parent / "experiments"
    for path in sorted(experiments.rglob("*")):
        if path.is_file() and path.suffix in KINDS:
            uri = "studies/" + path.relative_to(experiments).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    # A study's README links the guides as the repository lays them out (../../docs/x.md), which works
    # on GitHub; on the site the guides sit at the root, two levels above studies/<name>/.
    if page.file.src_uri.startswith("studies/") and page.file.src_uri.count("/") == 2:
        return markdown.replace("](../../docs/", "](../../")
    return markdown
