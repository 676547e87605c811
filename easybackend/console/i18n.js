// English and Chinese strings; the language comes from the browser unless chosen.
const STRINGS = {
  en: {
    rollback: "Undo last turn", newChat: "New chat", search: "Search", apiDocs: "API docs", rename: "Rename", export: "Export",
    delete: "Delete", settings: "Settings", send: "Send", stop: "Stop", stopping: "Stopping…",
    placeholder: "Message (Enter to send, Shift+Enter for a new line)",
    titleLabel: "Title", system: "System prompt", model: "Model", temperature: "Temperature",
    memory: "Memory", serverDefault: "server default", save: "Save", summary: "Summary",
    noSummary: "No summary yet", saveSummary: "Save summary", keyNeeded: "This server needs an API key.",
    keyRefused: "That key was refused (401): enter another.", enterKey: "Enter a key",
    keyPlaceholder: "API key", keyKept: "Kept in this tab only (sessionStorage).", ok: "OK",
    edit: "Edit", regenerate: "Regenerate", saved: "Saved", untitled: "New conversation",
    confirmDelete: "Delete this conversation?", renamePrompt: "New title",
    unauthorized: "Requests fail: this server needs a valid API key (401).",
    cancelled: "stopped", failed: "Failed",
  },
  zh: {
    rollback: "撤销上一轮", newChat: "新对话", search: "搜索", apiDocs: "API 文档", rename: "重命名", export: "导出",
    delete: "删除", settings: "设置", send: "发送", stop: "停止", stopping: "正在停止…",
    placeholder: "输入消息（Enter 发送，Shift+Enter 换行）",
    titleLabel: "标题", system: "系统提示词", model: "模型", temperature: "温度",
    memory: "记忆", serverDefault: "服务器默认", save: "保存", summary: "摘要",
    noSummary: "暂无摘要", saveSummary: "保存摘要", keyNeeded: "此服务器需要 API 密钥。",
    keyRefused: "该密钥被拒绝（401），请输入另一个。", enterKey: "输入密钥",
    keyPlaceholder: "API 密钥", keyKept: "仅保存在本标签页（sessionStorage）。", ok: "确定",
    edit: "编辑", regenerate: "重新生成", saved: "已保存", untitled: "新对话",
    confirmDelete: "删除这个对话？", renamePrompt: "新标题",
    unauthorized: "请求失败：此服务器需要有效的 API 密钥（401）。",
    cancelled: "已停止", failed: "失败",
  },
};

let lang = localStorage.getItem("easybackend.lang") ||
  ((navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en");

export const t = (name) => STRINGS[lang][name] ?? STRINGS.en[name] ?? name;
export const language = () => lang;

export function apply(root = document) {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const node of root.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  for (const node of root.querySelectorAll("[data-i18n-placeholder]")) {
    node.placeholder = t(node.dataset.i18nPlaceholder);
  }
}

export function setLanguage(next) {
  lang = STRINGS[next] ? next : "en";
  localStorage.setItem("easybackend.lang", lang);
  apply();
}
