#!/usr/bin/env bash
# Helpers shared by launch/tpu/*.sh (sourced, never run): flag parsing, one-line errors, shell quoting and
# run_or_print, the single switch between --dry-run (print each command) and real mode (run it).
# shellcheck disable=SC2034  # VALUE, SHIFT, REPO_ROOT are read by the scripts that source this file

DRY_RUN=${DCR_DRY_RUN:-0}
VALUE=""  # set by take_value: the flag's value
SHIFT=1   # set by take_value and the scripts' parse loops: how many arguments the flag consumed
LAUNCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)  # .../launch
REPO_ROOT=$(cd "$LAUNCH_ROOT/.." && pwd)
SAFE_WORD='^[A-Za-z0-9_@%+=:,./-]+$'  # arguments that need no shell quoting

die() {  # a usage error: one line on stderr, exit status 2
  printf 'error: %s\n' "$*" >&2
  exit 2
}

fail() {  # a runtime failure (gcloud said no, a timeout): one line on stderr, exit status 1
  printf 'error: %s\n' "$*" >&2
  exit 1
}

note() {  # progress for people; on stderr, so a dry run's stdout holds only commands
  printf '%s\n' "$*" >&2
}

take_value() {
  # take_value "$@" inside a parse loop: VALUE = the value of `--flag=VALUE` or `--flag VALUE`; SHIFT = 1 or 2.
  if [[ $1 == *=* ]]; then
    VALUE=${1#*=}
    SHIFT=1
  elif (($# >= 2)) && [[ $2 != --* ]]; then
    VALUE=$2
    SHIFT=2
  else
    die "$1 needs a value (see --help)"
  fi
}

require() {
  # require VALUE FLAG ENV_VAR: the one-line error for a missing required flag.
  [[ -n $1 ]] || die "$2 is required (or set $3); see --help"
}

check_int() {
  # check_int VALUE FLAG: VALUE must be a non-negative integer.
  [[ $1 =~ ^[0-9]+$ ]] || die "$2=$1 must be a non-negative integer"
}

check_name() {
  # Queued-resource and node names: lowercase letters, digits and hyphens, starting with a letter (GCP naming).
  [[ $1 =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name=$1 is not a valid TPU name; use lowercase letters, digits and hyphens, starting with a letter"
}

location_flags() {
  # LOCATION=(--zone=ZONE [--project=PROJECT]): the flags every gcloud call here takes.
  LOCATION=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then
    LOCATION+=("--project=$PROJECT")
  fi
}

quote_arg() {
  # One argument as a shell word: bare when safe; `--flag='value'` keeps the flag name readable.
  local arg=$1 prefix=""
  if [[ $arg =~ $SAFE_WORD ]]; then
    printf '%s' "$arg"
    return
  fi
  if [[ $arg =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    arg=${BASH_REMATCH[2]}
  fi
  local escaped="'\\''"
  printf "%s'%s'" "$prefix" "${arg//\'/$escaped}"
}

remote_quote() {
  # A value for a remote bash command line: bare when safe, else double quotes, else printf %q.
  local arg=$1
  if [[ $arg =~ $SAFE_WORD ]]; then
    printf '%s' "$arg"
  elif [[ $arg != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$arg"
  else
    printf '%q' "$arg"
  fi
}

join_words() {
  # join_words QUOTER ARGS...: the arguments quoted by QUOTER and joined with spaces.
  local quoter=$1 out="" word
  shift
  for word in "$@"; do
    out+="${out:+ }$("$quoter" "$word")"
  done
  printf '%s' "$out"
}

run_or_print() {
  # --dry-run: print the command as one copy-pasteable line on stdout. Otherwise echo it to stderr and run it.
  if [[ $DRY_RUN == 1 ]]; then
    join_words quote_arg "$@"
    printf '\n'
  else
    note "+ $(join_words quote_arg "$@")"
    "$@"
  fi
}
