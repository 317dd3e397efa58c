// cold_lines.c: what touching L lines of one random 7 KiB object among OBJS costs, as a dependent
// walk (docs/benchmarks.md, session 24). cold_lines OBJS L SECS HUGE; build: cc -O2 cold_lines.c -o cold_lines
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
static int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
// HUGE 1 marks the objects MADV_HUGEPAGE, 0 MADV_NOHUGEPAGE; between walks ~400 us of other work.
int main(int argc,char**argv){
  size_t objs=atol(argv[1]), sz=7168, n=objs*sz; int L=atoi(argv[2]); int secs=atoi(argv[3]);
  char* m=mmap(0,n+(2<<20),PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0); m=(char*)(((unsigned long)m+(2<<20)-1)&~((2UL<<20)-1)); madvise(m,n,atoi(argv[4])?MADV_HUGEPAGE:MADV_NOHUGEPAGE);
  // each object: a chain through L lines in a fixed shuffled order: line k holds offset of next
  int order[112]; for(int i=0;i<112;i++) order[i]=i;
  unsigned long long seed=7; for(int i=111;i>0;i--){seed=seed*6364136223846793005ULL+1;int j=(seed>>33)%(i+1);int t=order[i];order[i]=order[j];order[j]=t;}
  memset(m,0,n);
  for(size_t o=0;o<objs;o++){ char* b=m+o*sz; for(int k=0;k<L;k++){ long nxt = k+1<L? order[k+1]*64 : -1; *(long*)(b+order[k]*64)=nxt; } }
  char* ws=malloc(1<<21); memset(ws,2,1<<21);
  volatile long sink=0; static double lat[100000]; int k=0; double end=now()+secs;
  while(now()<end && k<100000){
    seed=seed*6364136223846793005ULL+1442695040888963407ULL; size_t o=(seed>>20)%objs; char* b=m+o*sz;
    double t=now(); long off=order[0]*64; while(off>=0){ off=*(volatile long*)(b+off);} lat[k++]=now()-t;
    double t2=now(); while(now()-t2<400e-6){ for(int i=0;i<(1<<21);i+=64) sink+=ws[i]; }
  }
  qsort(lat,k,sizeof(double),cmp); double s=0; for(int i=0;i<k;i++) s+=lat[i];
  printf("objs %zu L=%d huge=%s: n=%d mean %.0f ns p50 %.0f p90 %.0f p99 %.0f\n",objs,L,argv[4],k,s/k*1e9,lat[k/2]*1e9,lat[k*9/10]*1e9,lat[k*99/100]*1e9);
}
