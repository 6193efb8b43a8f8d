/* An NVTX injection library that records ranges to a file, so tests can check NVTX without a profiler.
 *
 * NVTX loads the library named by NVTX_INJECTION64_PATH on the first NVTX call of a process and
 * calls its InitializeInjectionNvtx2, which points NVTX's push/pop/domain callbacks here.
 * Each event is one line of the file XLLM_NVTX_RECORD.<pid> (one file per process, so that a
 * process and the ones it starts do not mix their ranges):
 *     init
 *     push<TAB>domain<TAB>message
 *     pop<TAB>domain
 * (domain "-" for the global domain). The test builds it with the system C compiler:
 *     cc -shared -fPIC -I<include dir holding nvtx3/> nvtx_recorder.c -o libnvtx_recorder.so
 */
#define NVTX_NO_IMPL
#include <nvtx3/nvToolsExt.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static FILE* record;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void write_line(const char* kind, const char* domain, const char* message) {
  pthread_mutex_lock(&lock);
  if (message) {
    fprintf(record, "%s\t%s\t%s\n", kind, domain, message);
  } else {
    fprintf(record, "%s\t%s\n", kind, domain);
  }
  fflush(record);
  pthread_mutex_unlock(&lock);
}

/* Domain and registered-string handles are pointers to copies of their names. */
static const char* domain_name(nvtxDomainHandle_t domain) { return domain ? (const char*)domain : "-"; }

static const char* message_of(const nvtxEventAttributes_t* a) {
  if (!a) return "";
  switch (a->messageType) {
    case NVTX_MESSAGE_TYPE_ASCII: return a->message.ascii ? a->message.ascii : "";
    case NVTX_MESSAGE_TYPE_REGISTERED: return a->message.registered ? (const char*)a->message.registered : "";
    default: return "<unsupported message type>";
  }
}

static nvtxDomainHandle_t NVTX_API domain_create(const char* name) { return (nvtxDomainHandle_t)strdup(name); }

static nvtxStringHandle_t NVTX_API register_string(nvtxDomainHandle_t domain, const char* text) {
  (void)domain;
  return (nvtxStringHandle_t)strdup(text);
}

static int NVTX_API domain_push(nvtxDomainHandle_t domain, const nvtxEventAttributes_t* a) {
  write_line("push", domain_name(domain), message_of(a));
  return 0;
}

static int NVTX_API domain_pop(nvtxDomainHandle_t domain) {
  write_line("pop", domain_name(domain), NULL);
  return 0;
}

static int NVTX_API push_ex(const nvtxEventAttributes_t* a) { return domain_push(NULL, a); }

static int NVTX_API push_a(const char* message) {
  write_line("push", "-", message);
  return 0;
}

static int NVTX_API pop(void) { return domain_pop(NULL); }

static int set(NvtxGetExportTableFunc_t get_table, NvtxCallbackModule module, unsigned id, NvtxFunctionPointer fn) {
  const NvtxExportTableCallbacks* callbacks = (const NvtxExportTableCallbacks*)get_table(NVTX_ETID_CALLBACKS);
  NvtxFunctionTable table = 0;
  unsigned size = 0;
  if (!callbacks || !callbacks->GetModuleFunctionTable(module, &table, &size) || !table || id >= size) return 0;
  *table[id] = fn;
  return 1;
}

int NVTX_API InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get_table) {
  const char* prefix = getenv("XLLM_NVTX_RECORD");
  char path[4096];
  snprintf(path, sizeof path, "%s.%ld", prefix ? prefix : "nvtx_record", (long)getpid());
  record = fopen(path, "a");
  if (!record) return 0;
  write_line("init", "-", NULL);
  return set(get_table, NVTX_CB_MODULE_CORE2, NVTX_CBID_CORE2_DomainCreateA, (NvtxFunctionPointer)domain_create) &&
         set(get_table, NVTX_CB_MODULE_CORE2, NVTX_CBID_CORE2_DomainRegisterStringA,
             (NvtxFunctionPointer)register_string) &&
         set(get_table, NVTX_CB_MODULE_CORE2, NVTX_CBID_CORE2_DomainRangePushEx, (NvtxFunctionPointer)domain_push) &&
         set(get_table, NVTX_CB_MODULE_CORE2, NVTX_CBID_CORE2_DomainRangePop, (NvtxFunctionPointer)domain_pop) &&
         set(get_table, NVTX_CB_MODULE_CORE, NVTX_CBID_CORE_RangePushEx, (NvtxFunctionPointer)push_ex) &&
         set(get_table, NVTX_CB_MODULE_CORE, NVTX_CBID_CORE_RangePushA, (NvtxFunctionPointer)push_a) &&
         set(get_table, NVTX_CB_MODULE_CORE, NVTX_CBID_CORE_RangePop, (NvtxFunctionPointer)pop);
}
