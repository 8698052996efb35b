# Sourced at the start of every device call (see bench/RESULTS.md): installs the carried wheels
# (../shared/device/make-wheelhouse.sh torchao==0.18.0 builds .whl/) and keeps NVLink multicast off.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed || return 1
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, diffusers, peft, ray; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'ray', ray.__version__)"
