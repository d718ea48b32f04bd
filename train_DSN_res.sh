#!/usr/bin/env bash
# DSN-ResNet-50 (DSN-Res-50/run_dsn_res50.py), fine-tuning ImageNet ResNet-50, on a true ResNet-50
# (dsn_resnet50): Caffe cannot load ResNet-50 weights into the released net, whose conv1 has no bias
# (docs/nets.md); EMOTIW_SOLVER=prototxt/dsn_resnet/solver.prototxt trains that one with its own weights.
# Usage: ./train_DSN_res.sh [caffe train flags...]; see scripts/caffe_train.sh for the EMOTIW_SOLVER,
# EMOTIW_WEIGHTS, CAFFE and GPU overrides, and docs/nets.md for the nets and weights.
exec "$(dirname "$0")/scripts/caffe_train.sh" prototxt/dsn_resnet50/solver.prototxt \
    models/pretrained/ResNet-50-model.caffemodel "$@"
