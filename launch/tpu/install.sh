#!/usr/bin/env bash
# Install dcr_jax (and optionally a model's HF weights) on every worker of a TPU VM or pod slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu/install.sh --name=NAME --zone=ZONE [options]

On every worker (gcloud compute tpus tpu-vm ssh NAME --worker=all): puts the source in REMOTE_DIR, makes a Python
venv REMOTE_DIR/.venv with uv (the TPU images ship Python 3.10; dcr_jax needs >= 3.11), then runs
`pip install -e . "jax[tpu]" gcsfs` there (gcsfs lets etils.epath, which orbax uses, read and write gs://
workdirs). Safe to re-run: it updates the source and the venv in place.

Source of the code:
  --source=local               (default) `git archive` of this checkout's committed HEAD, copied with
                               gcloud compute tpus tpu-vm scp --worker=all; uncommitted changes are NOT included
  --source=git:URL[@REF]       every worker fetches URL at REF (branch, tag or commit; default HEAD) itself,
                               e.g. git:https://github.com/ORG/dcr_jax.git@main

Flags (environment variable defaults in brackets):
  --name=NAME                  TPU node name (= queued resource name from create.sh) [DCR_TPU_NAME] (required)
  --zone=ZONE                  [DCR_ZONE] (required)
  --project=PROJECT            omitted = gcloud's configured project [DCR_PROJECT]
  --source=local|git:URL[@REF] see above [DCR_SOURCE]
  --remote-dir=DIR             install directory on the workers, relative to the home directory
                               (default dcr_jax) [DCR_REMOTE_DIR]
  --python-version=X.Y         Python for the venv, fetched by uv if the image lacks it (default 3.11)
                               [DCR_PYTHON_VERSION]
  --jax=SPEC                   the JAX requirement (default "jax[tpu]", which pulls the matching libtpu) [DCR_JAX]
  --pip=SPEC                   one more pip requirement; repeatable
  --hf-model=ID                also download this HF model (safetensors + tokenizer, no .gguf) on every worker,
                               e.g. google/gemma-2b [DCR_HF_MODEL]
  --weights-dir=DIR            where, relative to REMOTE_DIR (default models/<last part of ID>); pass the same
                               path to run.sh as --config.model.weights=DIR [DCR_WEIGHTS_DIR]
  --hf-token-file=FILE         copy this HF token file (e.g. ~/.cache/huggingface/token after `hf auth login`)
                               to every worker first; needed for gated models such as Gemma [DCR_HF_TOKEN_FILE]
  --dry-run                    print the commands instead of running them [DCR_DRY_RUN=1]
  -h, --help                   this help

Example:
  launch/tpu/install.sh --name=dcr-v5e --zone=us-west4-a --hf-model=google/gemma-2b \
    --hf-token-file="$HOME/.cache/huggingface/token"
EOF
}

NAME=${DCR_TPU_NAME:-}
ZONE=${DCR_ZONE:-}
PROJECT=${DCR_PROJECT:-}
SOURCE=${DCR_SOURCE:-local}
REMOTE_DIR=${DCR_REMOTE_DIR:-dcr_jax}
PYTHON_VERSION=${DCR_PYTHON_VERSION:-3.11}
JAX_SPEC=${DCR_JAX:-jax[tpu]}
PIP_EXTRA=()
HF_MODEL=${DCR_HF_MODEL:-}
WEIGHTS_DIR=${DCR_WEIGHTS_DIR:-}
HF_TOKEN_FILE=${DCR_HF_TOKEN_FILE:-}

while (($#)); do
  SHIFT=1
  case $1 in
    --name | --name=*) take_value "$@" && NAME=$VALUE ;;
    --zone | --zone=*) take_value "$@" && ZONE=$VALUE ;;
    --project | --project=*) take_value "$@" && PROJECT=$VALUE ;;
    --source | --source=*) take_value "$@" && SOURCE=$VALUE ;;
    --remote-dir | --remote-dir=*) take_value "$@" && REMOTE_DIR=$VALUE ;;
    --python-version | --python-version=*) take_value "$@" && PYTHON_VERSION=$VALUE ;;
    --jax | --jax=*) take_value "$@" && JAX_SPEC=$VALUE ;;
    --pip | --pip=*) take_value "$@" && PIP_EXTRA+=("$VALUE") ;;
    --hf-model | --hf-model=*) take_value "$@" && HF_MODEL=$VALUE ;;
    --weights-dir | --weights-dir=*) take_value "$@" && WEIGHTS_DIR=$VALUE ;;
    --hf-token-file | --hf-token-file=*) take_value "$@" && HF_TOKEN_FILE=$VALUE ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift "$SHIFT"
done

require "$NAME" --name DCR_TPU_NAME
check_name "$NAME"
require "$ZONE" --zone DCR_ZONE
[[ -n $REMOTE_DIR && $REMOTE_DIR != /* && $REMOTE_DIR != *..* ]] ||
  die "--remote-dir=$REMOTE_DIR must be a path relative to the workers' home directory"
[[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "--python-version=$PYTHON_VERSION must look like 3.11"
if [[ -n $HF_TOKEN_FILE && -z $HF_MODEL ]]; then
  die "--hf-token-file is only used with --hf-model"
fi
if [[ -n $HF_TOKEN_FILE && ! -f $HF_TOKEN_FILE ]]; then
  die "--hf-token-file=$HF_TOKEN_FILE: no such file (run \`hf auth login\` to create ~/.cache/huggingface/token)"
fi
if [[ -n $HF_MODEL && -z $WEIGHTS_DIR ]]; then
  WEIGHTS_DIR=models/${HF_MODEL##*/}
fi
location_flags
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${LOCATION[@]}")
SCP=(gcloud compute tpus tpu-vm scp)
DIR_Q=$(remote_quote "$REMOTE_DIR")

# The environment: uv (user install) makes a venv with the wanted Python, pip installs the package into it.
PIP_SPECS=$(join_words remote_quote "$JAX_SPEC" gcsfs ${PIP_EXTRA[@]+"${PIP_EXTRA[@]}"})
SETUP="cd $DIR_Q && export PATH=\"\$HOME/.local/bin:\$PATH\""
SETUP+=" && { command -v uv >/dev/null || python3 -m pip install --user --quiet uv"
SETUP+=" || python3 -m pip install --user --quiet --break-system-packages uv; }"
SETUP+=" && uv venv --seed --allow-existing --python $PYTHON_VERSION .venv"
SETUP+=" && .venv/bin/python -m pip install --quiet --upgrade pip"
SETUP+=" && .venv/bin/python -m pip install --quiet -e . $PIP_SPECS"
SETUP+=" && .venv/bin/python -c \"import dcr_jax, jax; print(jax.__version__)\""
if [[ -n $HF_TOKEN_FILE ]]; then
  SETUP+=" && mkdir -p \"\$HOME/.cache/huggingface\""
fi

case $SOURCE in
  local)
    TARBALL=${TMPDIR:-/tmp}/dcr_jax-$NAME.tar.gz
    REMOTE_TARBALL=dcr_jax-src.tar.gz
    run_or_print git -C "$REPO_ROOT" archive --format=tar.gz "--output=$TARBALL" HEAD
    run_or_print "${SCP[@]}" "$TARBALL" "$NAME:$REMOTE_TARBALL" --worker=all "${LOCATION[@]}"
    FETCH="mkdir -p $DIR_Q && tar -xzf $REMOTE_TARBALL -C $DIR_Q && rm $REMOTE_TARBALL"
    ;;
  git:?*)
    SPEC=${SOURCE#git:}
    if [[ ${SPEC##*[/:]} == *@* ]]; then
      URL=${SPEC%@*}
      REF=${SPEC##*@}
    else
      URL=$SPEC
      REF=HEAD
    fi
    [[ -n $URL && -n $REF ]] || die "--source=$SOURCE must be git:URL or git:URL@REF"
    FETCH="git init --quiet $DIR_Q && git -C $DIR_Q fetch --quiet --depth=1 $(remote_quote "$URL") $(remote_quote "$REF")"
    FETCH+=" && git -C $DIR_Q checkout --quiet --force --detach FETCH_HEAD"
    ;;
  *) die "--source=$SOURCE must be local or git:URL[@REF]" ;;
esac
run_or_print "${SSH[@]}" "--command=$FETCH && $SETUP"

if [[ -n $HF_MODEL ]]; then
  if [[ -n $HF_TOKEN_FILE ]]; then
    run_or_print "${SCP[@]}" "$HF_TOKEN_FILE" "$NAME:.cache/huggingface/token" --worker=all "${LOCATION[@]}"
  fi
  DOWNLOAD="cd $DIR_Q && .venv/bin/hf download $(remote_quote "$HF_MODEL") --local-dir $(remote_quote "$WEIGHTS_DIR")"
  DOWNLOAD+=" --exclude \"*.gguf\""
  run_or_print "${SSH[@]}" "--command=$DOWNLOAD"
  note "weights: ~/$REMOTE_DIR/$WEIGHTS_DIR on every worker; run.sh ... -- --config.model.weights=$WEIGHTS_DIR"
fi
