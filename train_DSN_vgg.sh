#!/usr/bin/env bash
# DSN-VGG-FACE (DSN-VGG-FACE/run_dsn.py): fine-tunes the VGG-Face model.
# Usage: ./train_DSN_vgg.sh [caffe train flags...]; see scripts/caffe_train.sh for the EMOTIW_SOLVER,
# EMOTIW_WEIGHTS, CAFFE and GPU overrides, and docs/nets.md for the nets and weights.
exec "$(dirname "$0")/scripts/caffe_train.sh" prototxt/dsn_vgg_face/solver.prototxt models/pretrained/VGG_FACE.caffemodel "$@"
