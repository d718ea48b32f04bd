"""The convolution of the installed Caffe (caffe_patches/0004: chunks of images per GEMM on the CPU;
0005: im2col and col2im by rows) against an independent float64 formula on the layer shapes of our
nets, its im2col and col2im against numpy's, the patched build against the one without our speed
patches (0004, 0005, 0008) on whole nets, forward and backward, and oneDNN's convolutions (0007) against
Caffe's own: which passes run on it, whole nets, and 50 training iterations."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emotiw import nets
from tools import caffe_build

REPO = Path(__file__).resolve().parent.parent
OUTPUTS = REPO / "tests" / "caffe_outputs.py"
# The batched path's rule (src/caffe/layers/base_conv_layer.cpp, cpu_chunk_images)
CHUNK_MAX_SPATIAL, CHUNK_MIN_WEIGHTS, CHUNK_COLUMNS = 256, 1 << 16, 1024
MAX_MACS, MAX_COLUMN_VALUES = 2e8, 2e7  # what one reference layer may cost here


def pair(values, default):
    values = list(values)
    return (values * 2 if len(values) == 1 else values) if values else [default, default]


def geometry(layer, bottom):
    """(C, H, W, M, (kh, kw), (sh, sw), (ph, pw), (dh, dw), group, bias) of a Convolution layer."""
    p = layer.convolution_param
    kernel = [p.kernel_h, p.kernel_w] if p.kernel_h else pair(p.kernel_size, 1)
    stride = [p.stride_h, p.stride_w] if p.stride_h else pair(p.stride, 1)
    pad = [p.pad_h, p.pad_w] if p.pad_h or p.pad_w else pair(p.pad, 0)
    return (*bottom[1:], p.num_output, tuple(kernel), tuple(stride), tuple(pad), tuple(pair(p.dilation, 1)),
            p.group, p.bias_term)


def output_size(c, h, w, m, kernel, stride, pad, dilation):
    return [(size + 2 * pd - (dl * (k - 1) + 1)) // st + 1
            for size, k, st, pd, dl in zip((h, w), kernel, stride, pad, dilation)]


def chunked(geo):
    c, h, w, m, kernel, stride, pad, dilation, group, _ = geo
    spatial = math.prod(output_size(c, h, w, m, kernel, stride, pad, dilation))
    return spatial < CHUNK_MAX_SPATIAL and m * c // group * math.prod(kernel) >= CHUNK_MIN_WEIGHTS, spatial


def layer_cases():
    """One convolution per kind (kernel, stride, pad, dilation, grouped, chunked or not, 1x1) over every
    registered net, the cheapest of its kind, with a batch that needs several chunks where the
    cost allows."""
    kinds = {}
    for name in nets.names():
        shapes = nets.shapes(name)
        for layer in nets.build(name, "deploy").layer:
            if layer.type != "Convolution":
                continue
            geo = geometry(layer, shapes.blobs[layer.bottom[0]])
            c, h, w, m, kernel, stride, pad, dilation, group, _ = geo
            batched, spatial = chunked(geo)
            per_image = spatial * m * c // group * math.prod(kernel)
            kind = (kernel, stride, pad, dilation, group > 1, batched, spatial == 1)
            if kind not in kinds or per_image < kinds[kind][1]:
                kinds[kind] = (geo, per_image, spatial, f"{name}/{layer.name}")
    for geo, per_image, spatial, where in kinds.values():
        c, m, kernel = geo[0], geo[3], geo[4]
        wanted = 2 * math.ceil(CHUNK_COLUMNS / spatial) + 1 if chunked(geo)[0] else 3
        affordable = min(MAX_MACS / per_image, MAX_COLUMN_VALUES / (c * math.prod(kernel) * spatial))
        yield pytest.param(geo, max(2, min(wanted, int(affordable))), id=where)


def windows(kernel, stride, dilation, out):
    """For each kernel position (i, j), the slices of the padded image its output columns read."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out
    return [((i, j), (slice(i * dh, i * dh + sh * (oh - 1) + 1, sh), slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)))
            for i in range(kh) for j in range(kw)]


def unfold(x, kernel, stride, pad, dilation):
    """im2col in numpy: the (n, c, kh, kw, oh, ow) columns of x, zeros where a kernel reads padding."""
    n, c, h, w = x.shape
    out = output_size(c, h, w, 0, kernel, stride, pad, dilation)
    padded = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    cols = np.empty((n, c, *kernel, *out), x.dtype)
    for (i, j), (rows, columns) in windows(kernel, stride, dilation, out):
        cols[:, :, i, j] = padded[:, :, rows, columns]
    return cols


def fold(cols, shape, stride, pad, dilation):
    """col2im in numpy, unfold's adjoint: each column's value added to the pixel it was read from."""
    n, c, h, w = shape
    kernel, out = cols.shape[2:4], cols.shape[4:]
    padded = np.zeros((n, c, h + 2 * pad[0], w + 2 * pad[1]), cols.dtype)
    for (i, j), (rows, columns) in windows(kernel, stride, dilation, out):
        padded[:, :, rows, columns] += cols[:, :, i, j]
    return padded[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + w]


def reference(x, w, b, dy, stride, pad, dilation, group):
    """float64 convolution by unfolding (im2col) and its gradients: y, dx, dw, db."""
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    oh, ow = output_size(c, h, wd, m, (kh, kw), stride, pad, dilation)
    cols = unfold(x, (kh, kw), stride, pad, dilation).reshape(n, group, cg * kh * kw, oh * ow)
    wg = w.reshape(group, m // group, cg * kh * kw)
    y = np.einsum("gmk,ngkp->ngmp", wg, cols, optimize=True).reshape(n, m, oh, ow) + b[:, None, None]
    dyg = dy.reshape(n, group, m // group, oh * ow)
    dw_ = np.einsum("ngmp,ngkp->gmk", dyg, cols, optimize=True).reshape(w.shape)
    dcols = np.einsum("gmk,ngmp->ngkp", wg, dyg, optimize=True).reshape(n, c, kh, kw, oh, ow)
    return y, fold(dcols, x.shape, stride, pad, dilation), dw_, dy.sum(axis=(0, 2, 3))


@pytest.mark.parametrize("shape, kernel, pad, stride, dilation", [
    ((2, 3, 9, 11), (3, 3), (1, 1), (1, 1), (1, 1)),  # stride 1: whole rows copied between the padding
    ((1, 2, 12, 12), (7, 7), (3, 3), (1, 1), (1, 1)),  # the 7x7 stems
    ((1, 2, 6, 9), (3, 5), (2, 1), (1, 1), (2, 2)),  # dilated, a kernel wider than tall
    ((1, 2, 4, 3), (3, 3), (4, 5), (1, 1), (1, 1)),  # padding wider than the image: rows of zeros only
    ((2, 3, 9, 11), (3, 3), (1, 1), (2, 2), (1, 1)),  # stride 2: one column at a time
    ((1, 2, 8, 9), (1, 3), (0, 1), (2, 1), (1, 1)),  # stride 1 across, 2 down
])
def test_im2col_and_col2im_move_every_value(shape, kernel, pad, stride, dilation, tmp_path):
    """Caffe's Im2col layer runs im2col_cpu forward and col2im_cpu backward (caffe_patches/0005 copies
    the rows of stride-1 kernels whole). Small whole numbers make every sum exact, so both must equal
    numpy's unfold and fold exactly."""
    from caffe import layers as L

    from emotiw.caffe.env import import_caffe

    caffe = import_caffe()
    caffe.set_mode_cpu()
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    n.cols = L.Im2col(n.data, convolution_param=dict(kernel_h=kernel[0], kernel_w=kernel[1], pad_h=pad[0],
                                                     pad_w=pad[1], stride_h=stride[0], stride_w=stride[1],
                                                     dilation=list(dilation)))
    net = backward_net(caffe, n, tmp_path)
    rng = np.random.default_rng(1)
    x = rng.integers(-8, 9, shape).astype(np.float32)
    net.blobs["data"].data[...] = x
    cols = net.forward()["cols"]
    expected = unfold(x, kernel, stride, pad, dilation)
    assert np.array_equal(cols, expected.reshape(cols.shape))
    dcols = rng.integers(-8, 9, cols.shape).astype(np.float32)
    net.blobs["cols"].diff[...] = dcols
    net.backward()
    assert np.array_equal(net.blobs["data"].diff, fold(dcols.reshape(expected.shape), shape, stride, pad, dilation))


def backward_net(caffe, spec, tmp_path):
    """The pycaffe net of a NetSpec, with gradients down to its input (pycaffe reads nets from files)."""
    proto = spec.to_proto()
    proto.force_backward = True
    path = tmp_path / "net.prototxt"
    path.write_text(str(proto))
    return caffe.Net(str(path), caffe.TEST)


def relative_error(ours, expected):
    return float(np.abs(ours - expected).max() / max(np.abs(expected).max(), 1e-30))


@pytest.mark.parametrize("engine", ["CAFFE", "DNNL"])
@pytest.mark.parametrize("geo,batch", list(layer_cases()))
def test_convolution_matches_the_float64_formula(geo, batch, engine, tmp_path):
    """Every kind of convolution of our nets, forward and backward, with Caffe's own forward pass and
    with oneDNN's (caffe_patches/0007; its backward pass is Caffe's)."""
    from caffe import layers as L, params as P

    from emotiw.caffe.env import import_caffe

    if engine == "DNNL":
        dnnl_build()
    caffe = import_caffe()
    caffe.set_mode_cpu()
    c, h, w, m, kernel, stride, pad, dilation, group, bias = geo
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, c, h, w]))
    n.conv = L.Convolution(n.data, num_output=m, kernel_h=kernel[0], kernel_w=kernel[1], stride_h=stride[0],
                           stride_w=stride[1], pad_h=pad[0], pad_w=pad[1], dilation=list(dilation), group=group,
                           bias_term=bias, engine=getattr(P.Convolution, engine))
    net = backward_net(caffe, n, tmp_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
    weights = net.params["conv"][0].data
    weights[...] = rng.standard_normal(weights.shape) / np.sqrt(weights[0].size)
    b = rng.standard_normal(m).astype(np.float32) if bias else np.zeros(m, np.float32)
    if bias:
        net.params["conv"][1].data[...] = b
    net.blobs["data"].data[...] = x
    y = net.forward()["conv"].copy()
    dy = rng.standard_normal(y.shape).astype(np.float32)
    net.blobs["conv"].diff[...] = dy
    for blob in net.params["conv"]:
        blob.diff[...] = 0
    net.backward()
    expected = reference(x.astype(np.float64), weights.astype(np.float64), b.astype(np.float64),
                         dy.astype(np.float64), stride, pad, dilation, group)
    ours = [y, net.blobs["data"].diff, net.params["conv"][0].diff] + ([net.params["conv"][1].diff] if bias else [])
    errors = {what: relative_error(got, want) for what, got, want in zip(("forward", "input gradient",
                                                                          "weight gradient", "bias gradient"),
                                                                         ours, expected)}
    assert max(errors.values()) < 1e-5, errors


# ---------------------------------------------------------------- patched against unpatched build

QUICK_NETS = ["sse_holonet_3conv-s_concat", "sse_densenet121_3conv-s_concat", "fer2013_mini_xception", "audio_mlp"]
# OpenBLAS sums each output in the same order whatever the GEMM's width, so the chunks change the last
# bits only: every blob, scores and gradients, within 1e-5 of its largest value. MKL picks other kernels
# for other shapes, and the deep nets' backward passes amplify float32 rounding a thousandfold: the
# gradients differ by up to 2.6e-3 (relative L2 norm of all parameter gradients, SSE-ResNet-50-4conv;
# DenseNet 7e-4) between the patched and unpatched MKL builds, as much as between the unpatched MKL and
# OpenBLAS builds (DenseNet 1e-3). There the scores are held to 1e-5 and the gradients, as a whole, to
# 1e-2, which a wrong chunk (an error of the gradients' own size) still fails by far.
TOLERANCE = 1e-5
MKL_GRADIENT_TOLERANCE = 1e-2


def build_pairs():
    """(patched, unpatched, flags) for the linked build's configuration and for the OpenBLAS CPU one:
    the prefixes of the builds with all of caffe_patches/ and without its SPEED_PATCHES; a skip if
    neither pair is in the cache."""
    linked = json.loads((caffe_build.VENV / "emotiw-caffe" / "emotiw-build.json").read_text())["cmake_flags"]
    orig, debian = caffe_build.source_tarballs()
    info = caffe_build.venv_info()
    pairs = []
    for flags in dict.fromkeys([tuple(linked), tuple(caffe_build.cmake_flags(info, gpu=False))]):
        patched = caffe_build.build_key(orig, debian, info, list(flags))
        all_patches = caffe_build.our_patches
        try:
            caffe_build.our_patches = lambda: [p for p in all_patches() if p.name not in caffe_build.SPEED_PATCHES]
            unpatched = caffe_build.build_key(orig, debian, info, list(flags))
        finally:
            caffe_build.our_patches = all_patches
        prefixes = [caffe_build.cache_root() / f"caffe-{key}" for key in (patched, unpatched)]
        if all((prefix / "emotiw-build.json").exists() for prefix in prefixes):
            pairs.append((*prefixes, flags))
    if not pairs:
        pytest.skip("no patched and unpatched (caffe_patches/ without 0004 and 0005) builds of one configuration "
                    f"in the cache {caffe_build.cache_root()}: build the unpatched one with those left out of "
                    "caffe_patches/series and `python3 tools/caffe_build.py build`")
    return pairs


def outputs(prefix, names, batch, tmp_path, **environment):
    """The folder of caffe_outputs.py's NET.npz files, run with the pycaffe of the build at prefix
    and `environment` (CAFFE_DNNL=1, say)."""
    out = tmp_path / "-".join([prefix.name, *(f"{key}={value}" for key, value in environment.items())])
    env = {"PYTHONPATH": str(prefix / caffe_build.PYCAFFE_DIR), "PATH": "/usr/bin:/bin", **environment}
    subprocess.run([sys.executable, str(OUTPUTS), str(out), *names, "--batch", str(batch)], check=True, env=env)
    return out


def load(folder, name):
    with np.load(folder / f"{name}.npz") as loaded:
        results = dict(loaded)
    return Path(str(results.pop("caffe"))).resolve(), results


def check_agreement(names, batch, tmp_path):
    for patched, unpatched, flags in build_pairs():  # Caffe's own convolutions, which 0004 and 0005 change
        ours, theirs = (outputs(prefix, names, batch, tmp_path, CAFFE_DNNL="0") for prefix in (patched, unpatched))
        for name in names:
            (our_caffe, our_blobs), (their_caffe, their_blobs) = load(ours, name), load(theirs, name)
            for folder in (ours, theirs):  # every blob of a ResNet-50 head: up to 1.5 GB a net
                (folder / f"{name}.npz").unlink()
            assert our_caffe.is_relative_to(patched) and their_caffe.is_relative_to(unpatched)
            assert our_blobs.keys() == their_blobs.keys() and any(key.startswith("forward/") for key in our_blobs)
            strict = our_blobs if "-DBLAS=MKL" not in flags else [k for k in our_blobs if k.startswith("forward/")]
            errors = {key: relative_error(our_blobs[key], their_blobs[key]) for key in strict}
            worst = max(errors, key=errors.get)
            assert errors[worst] <= TOLERANCE, f"{patched.name} {name} {worst}: {errors[worst]:.2e}"
            if "-DBLAS=MKL" in flags:
                gradients = [key for key in our_blobs if key.startswith("backward/")]
                ours_all, theirs_all = (np.concatenate([blobs[key].ravel().astype(np.float64) for key in gradients])
                                        for blobs in (our_blobs, their_blobs))
                error = np.linalg.norm(ours_all - theirs_all) / max(np.linalg.norm(theirs_all), 1e-30)
                assert error <= MKL_GRADIENT_TOLERANCE, f"{patched.name} {name} gradients: {error:.2e}"


def test_patched_build_agrees_with_the_unpatched_one(tmp_path):
    check_agreement(QUICK_NETS, 8, tmp_path)


@pytest.mark.slow
def test_patched_build_agrees_with_the_unpatched_one_on_every_net(tmp_path):
    check_agreement(nets.names(), 8, tmp_path)  # 8: two chunks at 14x14 outputs


def cudnn_builds():
    """Cached CUDA builds with cuDNN of the patches here (caffe_patches/0006), or a skip."""
    orig, debian = caffe_build.source_tarballs()
    info = caffe_build.venv_info()
    builds = []
    for path in sorted(caffe_build.cache_root().glob("caffe-*/emotiw-build.json")):
        build = json.loads(path.read_text())
        if build.get("cudnn") and path.parent.name == f"caffe-{caffe_build.build_key(orig, debian, info, build['cmake_flags'])}":
            builds.append(path.parent)
    if not builds:
        pytest.skip("no CUDA build with cuDNN of these patches in the cache: CAFFE_GPU=1 python3 tools/caffe_build.py build")
    return builds


def test_a_cuda_build_with_cudnn_sets_up_and_runs_the_nets_on_the_cpu(tmp_path):
    """Its layers are cuDNN's (convolution with dilation, pooling, ReLU, softmax), which must set up
    without a GPU and hand the CPU pass to Caffe's own code: the same scores and gradients as the
    CPU build. DSN-ResNet-50 has the dilated convolutions and DenseNet the average pooling."""
    linked = caffe_build.linked_prefix()
    names = ["sse_holonet_3conv-s_concat", "sse_densenet121_3conv-s_concat", "dsn_resnet50"]
    ours = outputs(linked, names, 2, tmp_path, CAFFE_DNNL="0")  # Caffe's own convolutions, as the CUDA build's
    for build in cudnn_builds():
        theirs = outputs(build, names, 2, tmp_path)
        for name in names:
            (our_caffe, our_blobs), (their_caffe, their_blobs) = load(ours, name), load(theirs, name)
            assert our_caffe.is_relative_to(linked) and their_caffe.is_relative_to(build)
            assert our_blobs.keys() == their_blobs.keys()
            errors = {key: relative_error(our_blobs[key], their_blobs[key]) for key in our_blobs}
            worst = max(errors, key=errors.get)
            assert errors[worst] <= TOLERANCE, f"{build.name} {name} {worst}: {errors[worst]:.2e}"


# The quick nets agree within 1e-5; DSN-ResNet-50's deepest side output (prob-dsn6, after 50 layers with
# BatchNorm statistics of two images) differs by 2.3e-4 (1.4e-4 with MKL), where MKL and OpenBLAS on
# Caffe's own path already differ by 6.8e-5: float32 rounding, each convolution kind being within 1e-5
# of the float64 formula (test_convolution_matches_the_float64_formula, engine DNNL).
ONEDNN_TOLERANCE = 5e-4
# Its gradients as a whole differ by 1.4e-2 (relative L2; 2.1e-2 in the MKL build), where MKL and
# OpenBLAS on Caffe's own path differ by 1.0e-2: the BatchNorm statistics of two images amplify the
# rounding, in the backward pass most. So its forward outputs are compared, and the quick nets' gradients.


def dnnl_build():
    linked = caffe_build.linked_prefix()
    if "-DUSE_DNNL=ON" not in json.loads((linked / "emotiw-build.json").read_text())["cmake_flags"]:
        pytest.skip("the linked Caffe build has no oneDNN engine (a CUDA build)")
    return linked


# One convolution of one image, 16 -> 32 channels, that oneDNN runs on blocked layouts
ONE_CONVOLUTION = ('input: "data" input_shape { dim: 1 dim: 16 dim: 10 dim: 10 }\n'
                   'layer { name: "a" type: "Convolution" bottom: "data" top: "a" convolution_param {'
                   ' num_output: 32 kernel_size: 3 bias_term: false weight_filler { type: "gaussian" } } }\n')
ONE_CONVOLUTION_WEIGHTS = "32x16x3x3"  # oneDNN's name of its weights' reorder


def onednn_steps(code, pythonpath, **environment):
    """(primitive, propagation, problem) of each primitive oneDNN's verbose log names for the Python
    `code` run in a fresh process with `pythonpath` and `environment` (None: unset)."""
    env = {"PYTHONPATH": pythonpath, "PATH": "/usr/bin:/bin", "ONEDNN_VERBOSE": "1", "GLOG_minloglevel": "2",
           **{name: value for name, value in environment.items() if value is not None}}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return [(fields[3], fields[5], fields[-2]) for fields in (line.split(",") for line in done.stdout.splitlines()
                                                           if line.startswith("onednn_verbose,exec,cpu,"))]


def onednn_passes(prefix, net, code, **environment):
    """The convolution passes (forward_inference, backward_data, ...) oneDNN ran for `code` on `net`
    with the pycaffe of the build at prefix."""
    steps = onednn_steps(f"import caffe; net = caffe.Net({str(net)!r}, caffe.{code}",
                         str(prefix / caffe_build.PYCAFFE_DIR), **environment)
    return sorted(propagation for primitive, propagation, _ in steps if primitive == "convolution")


def test_convolutions_run_on_onednn_as_caffe_dnnl_says(tmp_path):
    """oneDNN's verbose log names the convolution passes it ran (forward, and backward to the data and
    to the weights): those of engine DEFAULT and of `engine: CAFFE` (released prototxts set it against
    cuDNN), by default for batches of 2 and more only, with CAFFE_DNNL=1 for one image too, and none with
    CAFFE_DNNL=0; a TEST net's one image runs on oneDNN where the weights are promised constant
    (CAFFE_DNNL_CONSTANT_WEIGHTS=1, which TRAIN nets ignore)."""
    prefix = dnnl_build()
    runs = {}
    for batch in (1, 2):
        net = tmp_path / f"net{batch}.prototxt"
        net.write_text(f'input: "data" input_shape {{ dim: {batch} dim: 3 dim: 12 dim: 12 }}\n'
                       'force_backward: true\n'
                       'layer { name: "a" type: "Convolution" bottom: "data" top: "a" convolution_param {'
                       ' num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" } } }\n'
                       'layer { name: "b" type: "Convolution" bottom: "a" top: "b" convolution_param {'
                       ' num_output: 4 kernel_size: 3 engine: CAFFE weight_filler { type: "gaussian" } } }\n')
        for switch in ("1", "0", None):
            for constant in ("1", None):
                train = "TRAIN); net.forward(); net.backward()"
                runs[batch, switch, constant] = onednn_passes(prefix, net, train, CAFFE_DNNL=switch,
                                                              CAFFE_DNNL_CONSTANT_WEIGHTS=constant)
        for constant in ("1", None):
            runs[batch, "test", constant] = onednn_passes(prefix, net, "TEST); net.forward()",
                                                          CAFFE_DNNL_CONSTANT_WEIGHTS=constant)
    both = sorted(["backward_data", "backward_weights", "forward_inference"] * 2)  # layers a and b
    assert runs == {(1, "1", "1"): both, (1, "1", None): both, (1, "0", "1"): [], (1, "0", None): [],
                    (1, None, "1"): [], (1, None, None): [],
                    (2, "1", "1"): both, (2, "1", None): both, (2, "0", "1"): [], (2, "0", None): [],
                    (2, None, "1"): both, (2, None, None): both,
                    (1, "test", "1"): ["forward_inference"] * 2, (1, "test", None): [],
                    (2, "test", "1"): ["forward_inference"] * 2, (2, "test", None): ["forward_inference"] * 2}


def test_kept_weights_follow_what_pycaffe_writes(tmp_path):
    """A TEST net with its weights promised constant keeps them reordered between one-image passes, and
    reorders them again after pycaffe writes them (`net.params[...][0].data[...] = ...`): doubling the
    weights of a convolution without bias doubles its output, exactly."""
    prefix = dnnl_build()
    net = tmp_path / "net.prototxt"
    net.write_text(ONE_CONVOLUTION)
    code = ("import numpy as np, caffe; caffe.set_random_seed(1); net = caffe.Net(%r, caffe.TEST)\n"
            "net.blobs['data'].data[...] = np.random.default_rng(0).standard_normal((1, 16, 10, 10))\n"
            "first = net.forward()['a'].copy(); again = net.forward()['a'].copy()\n"
            "net.params['a'][0].data[...] *= 2; doubled = net.forward()['a'].copy()\n"
            "np.save(%r, np.stack([first, again, doubled]))" % (str(net), str(tmp_path / "out.npy")))
    steps = onednn_steps(code, str(prefix / caffe_build.PYCAFFE_DIR), CAFFE_DNNL_CONSTANT_WEIGHTS="1")
    passes = " ".join(primitive for primitive, _, problem in steps
                      if primitive == "convolution" or problem == ONE_CONVOLUTION_WEIGHTS)
    assert passes == "reorder convolution convolution reorder convolution"  # weights kept, then written
    first, again, doubled = np.load(tmp_path / "out.npy")
    assert np.abs(first).max() > 1
    assert np.array_equal(first, again)
    assert np.array_equal(doubled, 2 * first)


def test_onednn_forward_agrees_with_caffes_own_on_the_nets(tmp_path):
    """Every output of the forward pass of every quick net, DSN-ResNet-50 (dilated) and DSN-VGG-Face
    (whose `engine: CAFFE` convolutions run on oneDNN too), within
    ONEDNN_TOLERANCE with oneDNN and with Caffe's own convolutions; the quick nets' gradients (oneDNN's
    backward pass against Caffe's) within MKL_GRADIENT_TOLERANCE as a whole: DenseNet's backward pass
    amplifies float32 rounding, as between MKL and OpenBLAS."""
    prefix = dnnl_build()
    names = [*QUICK_NETS, "dsn_resnet50", "dsn_vgg_face"]
    folders = {switch: outputs(prefix, names, 2, tmp_path, CAFFE_DNNL=switch) for switch in ("1", "0")}
    for name in names:
        (_, ours), (_, theirs) = load(folders["1"], name), load(folders["0"], name)
        errors = {key: relative_error(ours[key], theirs[key]) for key in ours if key.startswith("forward/")}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= ONEDNN_TOLERANCE, f"{name} {worst}: {errors[worst]:.2e}"
        if name not in QUICK_NETS:
            continue
        gradients = [key for key in ours if key.startswith("backward/")]
        ours_all, theirs_all = (np.concatenate([blobs[key].ravel().astype(np.float64) for key in gradients])
                                for blobs in (ours, theirs))
        error = np.linalg.norm(ours_all - theirs_all) / max(np.linalg.norm(theirs_all), 1e-30)
        assert error <= MKL_GRADIENT_TOLERANCE, f"{name} gradients: {error:.2e}"


# glog's lines of `caffe train` with display: 1 ("Iteration 7 (3.1 iter/s, 0.32s/1 iters), loss = 1.9",
# and "Iteration 50, loss = 0.02" after the last step)
LOSS_LINE = re.compile(r"Iteration (\d+)[ ,].*loss = (\S+)$", re.MULTILINE)


def test_training_on_onednn_tracks_caffes_own_losses(tmp_path):
    """50 iterations of `caffe train` on HoloNet (random images and labels, batch 32 as the bench
    trains, one seed): with oneDNN's convolutions, forward and backward (CAFFE_DNNL=1), every loss is
    within 1e-3 of the one with Caffe's own (CAFFE_DNNL=0), while the losses fall by orders of
    magnitude. (Measured: at most 1.4e-4 apart; at batch 16, 1.0e-3: the BatchNorm statistics of fewer
    images amplify float32 rounding.)"""
    from bench.bench import dummy_train_net, write_training

    prefix = dnnl_build()
    name = "sse_holonet_3conv-s_concat"
    solver = write_training(tmp_path, dummy_train_net(name, 32, nets.get(name).preprocessing.input_size), 50)
    losses = {}
    for switch in ("1", "0"):
        env = {"PATH": "/usr/bin:/bin", "CAFFE_DNNL": switch, "GLOG_logtostderr": "1"}
        done = subprocess.run([str(prefix / "bin" / "caffe"), "train", "--solver", str(solver)], env=env,
                              capture_output=True, text=True, check=True)
        losses[switch] = dict((int(step), float(loss)) for step, loss in LOSS_LINE.findall(done.stderr))
    assert sorted(losses["1"]) == sorted(losses["0"]) == list(range(51))
    first, last = losses["0"][0], losses["0"][50]
    assert last < first / 100
    worst = max(abs(losses["1"][step] - losses["0"][step]) for step in range(51))
    assert worst <= 1e-3, f"the losses differ by up to {worst:.2e}"


def test_emotiw_inference_keeps_weights_for_one_image(tmp_path):
    """emotiw's pycaffe runtime promises constant weights (CAFFE_DNNL_CONSTANT_WEIGHTS), so one image
    runs on oneDNN with the weights reordered once: three passes, one weights reorder; the environment
    is restored after the net is made."""
    dnnl_build()
    net = tmp_path / "net.prototxt"
    net.write_text(ONE_CONVOLUTION)
    code = ("import os, numpy as np\nfrom emotiw.caffe.env import import_caffe\nfrom emotiw.caffe.runtime import PycaffeNet\n"
            f"caffe = import_caffe(); caffe.Net({str(net)!r}, caffe.TEST).save({str(tmp_path / 'w.caffemodel')!r})\n"
            f"net = PycaffeNet({str(net)!r}, {str(tmp_path / 'w.caffemodel')!r})\n"
            "assert 'CAFFE_DNNL_CONSTANT_WEIGHTS' not in os.environ\n"
            "for _ in range(3): net.forward(np.ones((1, 16, 10, 10), np.float32), ['a'])\n")
    steps = onednn_steps(code, str(REPO))
    assert sum(primitive == "convolution" for primitive, _, _ in steps) == 3
    assert sum(step == ("reorder", "undef", ONE_CONVOLUTION_WEIGHTS) for step in steps) == 1
