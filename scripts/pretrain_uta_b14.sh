#!/usr/bin/env bash
# UTA-B/14 (mask ratio 0.4, the paper card's base setting); see pretrain_uta.sh for the data/teacher variables.
MODEL=uta_b14_224 MASK_RATIO=0.4 DROP_PATH=0.0 MICRO_BATCH=${MICRO_BATCH:-128} \
  exec "$(dirname "$0")/pretrain_uta.sh" "$@"
