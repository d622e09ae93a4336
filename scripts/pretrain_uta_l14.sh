#!/usr/bin/env bash
# UTA-L/14 (mask ratio 0.5, the paper card's large setting); see pretrain_uta.sh for the data/teacher variables.
MODEL=uta_l14_224 MASK_RATIO=0.5 DROP_PATH=0.1 MICRO_BATCH=${MICRO_BATCH:-64} \
  exec "$(dirname "$0")/pretrain_uta.sh" "$@"
