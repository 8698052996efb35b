# Sourced at the start of every device call (see bench/RESULTS.md): installs the carried wheels and keeps NVLink
# multicast off. WHL names the carried wheelhouse (default .whl/: ../shared/device/make-wheelhouse.sh
# torchao==0.18.0, for the FP8 benches). The sweep bench needs MLflow instead (a sweep logs its trials there):
# WHL=.whl_sweep, built by make-wheelhouse.sh with the mlflow-skinny list in its header and without torchao
# (64 MiB carry limit); mlflow then needs a databricks stub at import (made below).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WHL=${WHL:-.whl}
if [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
    && touch /tmp/site/.installed || return 1
  if [ -d /tmp/site/mlflow ]; then mkdir -p /tmp/site/databricks && touch /tmp/site/databricks/__init__.py; fi
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, diffusers, peft, ray; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'ray', ray.__version__)"
