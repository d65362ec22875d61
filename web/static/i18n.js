// English and Simplified Chinese; the browser's language chooses (zh* -> Simplified Chinese).
"use strict";
const STRINGS = {
  en: {
    title: "Recognise photos",
    tab_recognise: "Recognise", tab_teach: "Teach a mode", tab_modes: "Modes",
    mode: "Mode", drop_hint: "Drop a photo here, paste one, or", choose_photo: "Choose a photo", take_photo: "Take a photo",
    imagenet: "ImageNet", classes_n: "{n} classes", version: "version {v}", answered: "Answered by version {v} in {ms} ms",
    working: "Recognising…",
    token_label: "Operator token (printed when the server started; kept in runtime/web/operator_token)",
    token_submit: "Unlock", token_needed: "This needs the operator token.",
    mode_name: "Name of the new mode",
    name_rule: "A letter, then letters, digits, _ or - (training the same name again makes its next version).",
    add_class: "Add a class", zip_choose: "…or one .zip with a folder per class",
    class_name: "Class name", class_photos: "Photos of this class", remove: "Remove", photos_n: "{n} photos",
    train_on: "Train it on", backbone_fast: "Fast: {name}, the served model's backbone",
    backbone_accurate: "Accurate: {name}", backbone_other: "{name}",
    hint_backbone_accurate: "Two networks on every photo: more accurate, but slower answers (about {cpu_ratio}× the CPU of {baseline}) and more memory (about {extra_worker_mb} MB more per worker).",
    trained_on: "Trained on {name}",
    train: "Train", jobs: "Training jobs", class: "Class", precision: "Precision", recall: "Recall", support: "Photos",
    confusion: "Confusion (rows: true class, columns: predicted)", wrong: "Validation photos it got wrong",
    none_wrong: "None: every validation photo was right.", deploy: "Deploy",
    limits: "Up to {photo} MB a photo, {set} MB and {files} photos in all; at least {min} photos per class.",
    few_photos: "Few photos: {list}. Five or more per class give a more honest score.",
    need_classes: "Add at least two classes with photos, or a .zip.",
    st_queued: "Waiting in the queue (position {p})", st_running: "Training", st_trained: "Trained",
    st_failed: "Failed", st_interrupted: "Interrupted", st_deploying: "Deploying (registering, checking, switching)…",
    st_deployed: "Deployed", st_deploy_failed: "Deploy failed",
    stage_data: "checking the photos", stage_features: "features {i}/{n}", stage_fit: "fitting",
    stage_evaluate: "evaluation", stage_archive: "writing the archive", stage_done: "done",
    accuracy: "Accuracy {a} on {n} validation photos",
    was: "true: {t}, answered: {p} ({pct})",
    default: "default", workers: "workers", trained: "trained", acc: "accuracy",
    make_default: "Make default", retire: "Retire", scale: "Scale", rollback: "Roll back",
    done_ok: "Done: {what}", confirm_retire: "Retire {name} version {v}?",
    no_modes: "No modes are registered.",
    err_not_image: "This file is not a photo the service can read. Send a JPEG, PNG, WebP, BMP or GIF.",
    err_no_photo: "No photo was sent.", err_too_large: "The photo is larger than 20 MB.",
    err_unknown_mode: "There is no such mode.",
    err_mode_busy: "This mode is being deployed or its workers are starting. Try again in a moment.",
    err_server_down: "The recognition server is not answering. Is TorchServe running?",
    err_timeout: "The recognition server took too long to answer.", err_failed: "The recognition failed on the server.",
    err_token_missing: "This action needs the operator token.", err_token_wrong: "The operator token is wrong.",
    err_refused: "Refused: {detail}", err_check_failed: "The new version failed its check; the default is unchanged.",
    err_network: "The page server is not answering.",
  },
  zh: {
    title: "识别照片",
    tab_recognise: "识别", tab_teach: "训练新模式", tab_modes: "模式",
    mode: "模式", drop_hint: "把照片拖到这里、粘贴，或者", choose_photo: "选择照片", take_photo: "拍照",
    imagenet: "ImageNet", classes_n: "{n} 个类别", version: "版本 {v}", answered: "由版本 {v} 回答，用时 {ms} 毫秒",
    working: "正在识别…",
    token_label: "操作员令牌（服务器启动时打印，保存在 runtime/web/operator_token）",
    token_submit: "解锁", token_needed: "此操作需要操作员令牌。",
    mode_name: "新模式的名称",
    name_rule: "以字母开头，可含字母、数字、_ 或 -（再次训练同名模式会生成下一个版本）。",
    add_class: "添加类别", zip_choose: "…或上传一个 .zip（每个类别一个文件夹）",
    class_name: "类别名称", class_photos: "该类别的照片", remove: "删除", photos_n: "{n} 张照片",
    train_on: "训练所用的骨干网络", backbone_fast: "快速：{name}（当前服务模型的骨干网络）",
    backbone_accurate: "准确：{name}", backbone_other: "{name}",
    hint_backbone_accurate: "每张照片运行两个网络：识别更准确，但回答更慢（CPU 用量约为 {baseline} 的 {cpu_ratio} 倍），内存也更多（每个工作进程约多 {extra_worker_mb} MB）。",
    trained_on: "训练所用的骨干网络：{name}",
    train: "训练", jobs: "训练任务", class: "类别", precision: "精确率", recall: "召回率", support: "照片数",
    confusion: "混淆矩阵（行：真实类别，列：预测类别）", wrong: "识别错误的验证照片",
    none_wrong: "没有：所有验证照片都识别正确。", deploy: "部署",
    limits: "每张照片最多 {photo} MB，总计最多 {set} MB、{files} 张；每个类别至少 {min} 张。",
    few_photos: "照片较少：{list}。每个类别五张以上，评分更可信。",
    need_classes: "请至少添加两个带照片的类别，或一个 .zip。",
    st_queued: "排队中（第 {p} 位）", st_running: "训练中", st_trained: "训练完成",
    st_failed: "失败", st_interrupted: "已中断", st_deploying: "部署中（注册、检查、切换）…",
    st_deployed: "已部署", st_deploy_failed: "部署失败",
    stage_data: "检查照片", stage_features: "提取特征 {i}/{n}", stage_fit: "拟合",
    stage_evaluate: "评估", stage_archive: "写入模型包", stage_done: "完成",
    accuracy: "在 {n} 张验证照片上的准确率为 {a}",
    was: "真实：{t}，回答：{p}（{pct}）",
    default: "默认", workers: "工作进程", trained: "训练于", acc: "准确率",
    make_default: "设为默认", retire: "下线", scale: "扩缩", rollback: "回滚",
    done_ok: "完成：{what}", confirm_retire: "下线 {name} 的版本 {v}？",
    no_modes: "没有已注册的模式。",
    err_not_image: "这个文件不是可识别的照片。请发送 JPEG、PNG、WebP、BMP 或 GIF。",
    err_no_photo: "没有发送照片。", err_too_large: "照片超过 20 MB。",
    err_unknown_mode: "没有这个模式。",
    err_mode_busy: "该模式正在部署或其工作进程正在启动，请稍后再试。",
    err_server_down: "识别服务器没有响应。TorchServe 是否在运行？",
    err_timeout: "识别服务器响应超时。", err_failed: "服务器端识别失败。",
    err_token_missing: "此操作需要操作员令牌。", err_token_wrong: "操作员令牌不正确。",
    err_refused: "被拒绝：{detail}", err_check_failed: "新版本未通过检查；默认版本未改变。",
    err_network: "页面服务器没有响应。",
  },
};

const LANG = (navigator.languages && navigator.languages[0] || navigator.language || "en")
  .toLowerCase().startsWith("zh") ? "zh" : "en";

function t(key, values) {
  let text = (STRINGS[LANG] && STRINGS[LANG][key]) || STRINGS.en[key] || key;
  for (const [name, value] of Object.entries(values || {})) text = text.split("{" + name + "}").join(String(value));
  return text;
}

function translatePage() {
  document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";
  for (const element of document.querySelectorAll("[data-i18n]")) element.textContent = t(element.dataset.i18n);
  document.title = t("title");
}
