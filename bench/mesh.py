"""Bench rows of the face mesh (issue 25): MediaPipe's network per face on Caffe (pycaffe and
OpenCV DNN reading the converted files) against the TF Lite interpreter with XNNPACK, the
original runtime, in the bench environment; and the frontalisation per face."""

import numpy as np


def face_crops(count):
    """`count` real 192x192 mesh inputs: the astronaut's face turned by a few degrees each."""
    import cv2
    import skimage.data

    from emotiw.face.mesh import crop, roi_transform
    from emotiw.face.mtcnn import FaceDetector

    image = skimage.data.astronaut()
    found = FaceDetector().detect(image)
    crops = []
    for index in range(count):
        turn = cv2.getRotationMatrix2D((256.0, 256.0), 3.0 * index, 1.0)
        turned = cv2.warpAffine(image, turn, (512, 512))
        box = found.boxes[0]
        eyes = cv2.transform(found.landmarks[0][None, :2].astype(np.float64), turn)[0]
        crops.append(crop(turned, roi_transform(box, eyes)))
    return image, found, np.stack(crops)


def bench_mesh(plan, results, reference, work, measure):
    from emotiw.face.frontal import frontal_crop
    from emotiw.face.mesh import FaceMesh, head_pose
    from emotiw.face.mesh_nets import tflite_file

    count = 8 if plan.quick else 32
    image, found, crops = face_crops(count)
    np.savez(work / "mesh_crops.npz", crops=crops)
    name = f"face mesh 192x192, {count} real faces"
    ref = reference.run("mesh", label=name, crops=str(work / "mesh_crops.npz"), model=str(tflite_file()),
                        repeats=plan.repeats, warmup=plan.warmup)
    ref_row = ref and results.add("mesh", name, "TF Lite + XNNPACK (ai-edge)", ref["rates"], "faces/s")
    for backend in ("pycaffe", "opencv"):
        face_mesh = FaceMesh(backend)
        rates = measure(lambda: [face_mesh.run(crop[None]) for crop in crops], count, plan)
        row = results.add("mesh", name, f"ours, {backend}", rates, "faces/s")
        results.ratio("mesh", name, row, ref_row)
    face_mesh = FaceMesh()
    points = face_mesh.mesh(image, found.boxes[:1], found.landmarks[:1]).points[0]
    pose = head_pose(points)
    rates = measure(lambda: [frontal_crop(image, points, 128, pose) for _ in range(count)], count, plan)
    results.add("mesh", "frontal crop 128x128 from the mesh", "ours (numpy, OpenCV remap)", rates, "faces/s")
