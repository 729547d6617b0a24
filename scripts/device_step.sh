# Sourced by the device scripts (gpu_kernels_check.sh, gpu_e2e_2gpu.sh), after $OUT exists.
# step NAME SECONDS COMMAND...: run COMMAND with a time box, keep its whole output in $OUT/NAME.txt,
# print its exit status and time and the lines that summarise it (pytest counts, parity results).
step() {
    local name=$1 secs=$2 t0=$SECONDS
    shift 2
    echo "=== $name"
    timeout -k 10 "$secs" "$@" > "$OUT/$name.txt" 2>&1
    echo "=== $name rc $? in $((SECONDS - t0)) s"
    grep -v "Ignore import error" "$OUT/$name.txt" \
        | grep -E "passed|failed|FAILED|Error|train_rollout|differ|HEADLINE|plugin o|step|^ *[0-9]+ \||^ctx |^ *[0-9]+ +[0-9]+ " | tail -25
}
