#!/usr/bin/env bash
# mypy over formats/, runtime/ and qtbuild/ under the names they are installed as
# (qtbuild.formats, qtbuild.runtime, qtbuild; settings in pyproject.toml [tool.mypy]).
# The folders are not laid out as their import names, and mypy cannot follow the import hook of
# setuptools' editable install, so mypy checks a tree of symlinks that is laid out so:
# .mypy_cache/layout/qtbuild/ holds qtbuild/'s entries plus formats -> formats/ and
# runtime -> runtime/.  Paths in the output are mapped back to the repository's.
# Extra arguments go to mypy.  Exit status: mypy's.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tree=$root/.mypy_cache/layout
rm -rf "$tree"
mkdir -p "$tree/qtbuild"
for entry in qtbuild/*; do
  ln -s "$root/$entry" "$tree/$entry"
done
ln -s "$root/formats" "$tree/qtbuild/formats"
ln -s "$root/runtime" "$tree/qtbuild/runtime"
cd "$tree"
set +e
"$root/.venv/bin/python" -m mypy --config-file "$root/pyproject.toml" --cache-dir "$root/.mypy_cache" "$@" -p qtbuild \
  | sed -e 's#^qtbuild/formats/#formats/#' -e 's#^qtbuild/runtime/#runtime/#'
exit "${PIPESTATUS[0]}"
