# Sourced by the GPU scripts after they set $out: on the device machine only what is written
# under $OUT comes back, so an output folder outside it (e.g. the literal word OUT instead of
# "$OUT": the first two calls of 2026-12-06 lost their files so, 11 minutes of device time) is
# refused before any work starts. Off the device ($OUT unset) anything goes.
if [ -n "${OUT:-}" ]; then
  case "$(realpath -m "$out")/" in
    "$(realpath -m "$OUT")"/*) ;;
    *) echo "$(basename "$0"): the output folder '$out' is not under \$OUT ($OUT): its files would not come back; pass \"\$OUT\" or a folder below it" >&2
       exit 2 ;;
  esac
fi
