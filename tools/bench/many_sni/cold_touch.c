// cold_touch.c: what one access to a random object of a large heap costs on this machine, as
// a handshake's first touch of a certificate's objects does (docs/benchmarks.md, session 23).
// cold_touch OBJECTS WRITE SECS HUGE: OBJECTS of 7 KiB each (100,000: ~700 MiB), one access
// (WRITE 1: an atomic add, 0: a read) to a random one, then ~400 us of other work over a 2 MiB
// working set, for SECS seconds; HUGE 1 puts the objects on transparent huge pages
// (MADV_HUGEPAGE), 0 forbids them. Prints the access latency: mean, p50, p90, p99.
// Build: cc -O2 cold_touch.c -o cold_touch
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
static int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
int main(int argc,char**argv){
  size_t objs=atol(argv[1]), sz=7168, n=objs*sz; int write=atoi(argv[2]); int secs=argc>3?atoi(argv[3]):8;
  char* m=mmap(0,n+(2<<20),PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0); m=(char*)(((unsigned long)m+(2<<20)-1)&~((2UL<<20)-1)); if(argc>4) madvise(m,n,atoi(argv[4])?MADV_HUGEPAGE:MADV_NOHUGEPAGE); memset(m,1,n);
  char* ws=malloc(1<<21); memset(ws,2,1<<21);
  unsigned long long seed=99; volatile long sink=0;
  static double lat[100000]; int k=0;
  double end=now()+secs;
  while(now()<end && k<100000){
    seed=seed*6364136223846793005ULL+1442695040888963407ULL;
    size_t o=(seed>>20)%objs;
    long* p=(long*)(m+o*sz+64);
    double t=now();
    if(write) __atomic_add_fetch(p,1,__ATOMIC_SEQ_CST); else sink+=*(volatile long*)p;
    lat[k++]=now()-t;
    // ~400 us of other work over a 2 MiB working set
    double t2=now(); while(now()-t2<400e-6){ for(int i=0;i<(1<<21);i+=64) sink+=ws[i]; }
  }
  qsort(lat,k,sizeof(double),cmp);
  double s=0; for(int i=0;i<k;i++) s+=lat[i];
  printf("objs %zu %s: n=%d mean %.0f ns p50 %.0f p90 %.0f p99 %.0f\n",objs,write?"write":"read",k,s/k*1e9,lat[k/2]*1e9,lat[k*9/10]*1e9,lat[k*99/100]*1e9);
}
