#!/usr/bin/env bash
# Write timm's train.py at a tag or commit to OUT. tests/test_timm_trainpy.py runs every DIR/<tag>/train.py
# (DIR: LTSAM_TIMM_TRAIN_DIR, default ../shared/timm-train next to the repository), so OUT=DIR/<tag>/train.py.
# train.py is in neither timm's wheel nor its sdist, so it comes from git: a local clone or bare mirror of
# huggingface/pytorch-image-models (GIT_DIR), or a shallow clone from GitHub when none is given.
# Usage: tools/get_timm_train.sh REF OUT [GIT_DIR]  (REF: a tag; any commit with GIT_DIR)
#   e.g. tools/get_timm_train.sh v1.0.26 /tmp/timm-train/v1.0.26/train.py
set -euo pipefail
ref=${1:?usage: $0 REF OUT [GIT_DIR]}
out=${2:?usage: $0 REF OUT [GIT_DIR]}
git_dir=${3:-}
if [[ -z $git_dir ]]; then
    git_dir=$(mktemp -d)
    trap 'rm -rf "$git_dir"' EXIT
    git clone --quiet --bare --depth 1 --branch "$ref" https://github.com/huggingface/pytorch-image-models "$git_dir"
fi
mkdir -p "$(dirname "$out")"
git --git-dir="$git_dir" show "$ref:train.py" > "$out"
echo "$out: train.py at $ref ($(git --git-dir="$git_dir" rev-parse "$ref^{commit}"))"
