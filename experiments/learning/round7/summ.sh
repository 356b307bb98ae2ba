#!/bin/bash
# usage: cd ${EXP_DIR:-/tmp/exp16} && summ.sh [runs/<run> ...]
# one line per run: recall, raw AR@100, AR@1000, AMG tuned AR@100 (masks), pred/true, stock AMG AR@100 (masks)
for r in ${@:-runs/*}; do r=${r#runs/}; f=runs/$r/eval.txt; [ -f $f ] || continue
rec=$(grep -o "recall@0.5 [0-9.]*" $f | head -1 | cut -d' ' -f2)
raw=$(grep "raw candidates" $f | awk '{print $(NF-2), $(NF-1)}')
amg=$(grep "AMG output" $f | awk '{print $(NF-2), "(" $NF ")"}')
cal=$(grep -o "mean predicted [0-9.]* / true [0-9.]*" $f | awk '{print $3 "/" $6}')
st=$(grep "AMG output" runs/$r/eval_stock.txt 2>/dev/null | awk '{print $(NF-2), "(" $NF ")"}')
echo "$r | rec $rec | AR100/1000 $raw | amg $amg | cal $cal | stock $st | $(cat runs/$r/wall.txt 2>/dev/null)"
done
