#!/bin/bash
# Source ROS and the workspace; build the TensorRT engines for this Jetson on first start
# (an engine is tied to its GPU and TensorRT version, so images never ship them).
set -e
source /opt/ros/humble/setup.bash
source /ws/install/setup.bash
if [ "${INFMLLM_BACKEND:-tensorrt}" = "tensorrt" ] && [ ! -f /engines/manifest.json ]; then
  echo "first start: building TensorRT engines into /engines (several minutes) ..."
  infmllm-build-engines --backend tensorrt --model "${INFMLLM_MODEL:-smollm2-135m}" --capacity "${INFMLLM_CAPACITY:-2048}" \
      --max-chunk "${INFMLLM_MAX_CHUNK:-64}" --out /engines
fi
exec "$@"
