import time, os, shutil, numpy as np, sys
from pathlib import Path
from mpimig.checkpoint import CheckpointStore
from mpimig.checkpoint import writer, auth, guard, reader
import mpimig.checkpoint.store as store_mod
T={}
def wrap(mod, name, label):
    f=getattr(mod,name)
    def g(*a,**k):
        t=time.perf_counter()
        try: return f(*a,**k)
        finally: T[label]=T.get(label,0)+time.perf_counter()-t
    setattr(mod,name,g)
wrap(writer,"write_file","src: write_file (hdf5+pwrite+crc+fsync)")
wrap(writer,"_write_direct","src:   _write_direct (pwrite+crc)")
wrap(auth,"file_digest","sha256 file digest (both sides)")
wrap(reader,"check_file_digest","dst: check_file_digest")
wrap(reader,"read_file","dst: read_file (hdf5 read + crc)")
n=int(sys.argv[1])<<20
d=Path(sys.argv[2])
shutil.rmtree(d,ignore_errors=True)
a=np.ones(n,np.uint8); a[::4096]=7
t0=time.perf_counter()
s=CheckpointStore(d,job_id="j",keep=1)
s.write_rank(1,0,1,0,{"u":a},{"x":1},{})
t1=time.perf_counter()
s.commit(1,1,0,{})
t2=time.perf_counter()
print("src write_rank", t1-t0, "commit", t2-t1)
if len(sys.argv)>3:
    fd=os.open(d/"epoch-000001"/"rank-00000.h5",os.O_RDONLY); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED); os.close(fd); print("dropped cache")
t3=time.perf_counter()
rs=CheckpointStore(d,create=False).read_rank(1,0)
t4=time.perf_counter()
print("dst read_rank", t4-t3)
for k,v in T.items(): print(f"  {k}: {v:.3f}")
shutil.rmtree(d)
