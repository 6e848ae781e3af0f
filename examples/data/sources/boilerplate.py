"""Web page furniture that scrapers capture around real content: menus, cookie notices, share buttons,
copyright lines, "read also" blocks; plus contact lines that shops append to product text.

make_sample.py wraps clean documents with these (prefix + body + suffix) to build `boilerplate`
and `contact_details` documents whose body is still worth keeping.
"""
from __future__ import annotations

# Text that appears before the article body (navigation bars, breadcrumbs, cookie banners).
PREFIXES_AR: list[str] = [
    "الرئيسية | أخبار محلية | اقتصاد | رياضة | تقنية | منوعات | اتصل بنا\n",
    "تسجيل الدخول  إنشاء حساب  English  القائمة  بحث\nالرئيسية > الأخبار > محليات\n",
    "نستخدم ملفات تعريف الارتباط (الكوكيز) لتحسين تجربتك على موقعنا. بمتابعة التصفح فإنك توافق على سياسة الخصوصية. [موافق] [المزيد]\n",
    "آخر تحديث: منذ 3 ساعات | وقت القراءة: دقيقتان | حجم الخط: أ+ أ-\n",
    "عاجل | عاجل | عاجل\nالرئيسية » منوعات » صحة وجمال\n",
    "القائمة الرئيسية ☰  الأقسام  الفيديو  الصور  الكتّاب  الأرشيف  النشرة البريدية\n",
]

# Text that appears after the article body (share buttons, copyright, related links, comments).
SUFFIXES_AR: list[str] = [
    "\nشارك: فيسبوك | تويتر | واتساب | تيليجرام | نسخ الرابط\nجميع الحقوق محفوظة © 2023",
    "\nاقرأ أيضًا:\n- أسعار الذهب اليوم\n- حالة الطقس غدًا\n- مواعيد الصلاة في مدينتك\nجميع الحقوق محفوظة لموقع الخبر اليوم 2024",
    "\nاشترك في النشرة البريدية ليصلك كل جديد. أدخل بريدك الإلكتروني [اشترك]\nسياسة الخصوصية | شروط الاستخدام | من نحن | اتصل بنا",
    "\nالتعليقات (0) | أضف تعليقًا\nالتعليقات المنشورة لا تعبر عن رأي الموقع.\n© جميع الحقوق محفوظة",
    "\nإعجاب 👍 234   مشاركة 🔁 56   حفظ 🔖\nتابعونا على مواقع التواصل الاجتماعي",
    "\nكلمات مفتاحية: أخبار، محليات، السعودية، اليوم\nالمصدر: وكالات | تحرير: فريق التحرير\nجميع الحقوق محفوظة © 2022 - 2024",
]

PREFIXES_EN: list[str] = [
    "Home | News | Business | Sport | Tech | Lifestyle | Contact\n",
    "We use cookies to improve your experience. By continuing to browse you agree to our Cookie Policy. [Accept all] [Manage settings]\n",
    "Skip to main content  Sign in  Subscribe  Menu  Search\n",
]

SUFFIXES_EN: list[str] = [
    "\nShare this article: Facebook | X | WhatsApp | Email | Copy link\n© 2024 All rights reserved.",
    "\nRelated stories:\n- 10 things to do this weekend\n- Weather: heatwave expected\nPrivacy Policy | Terms of Use | About Us",
    "\nSign up for our newsletter. Enter your email [Subscribe]\nComments (12) | Log in to comment",
]

# Contact lines appended to otherwise clean product pages, recipes or announcements, by name.
CONTACT_SUFFIXES: dict[str, str] = {
    "whatsapp_sa": "\nللطلب والاستفسار: واتساب 0551239876 أو اتصل على +966 55 123 9876",
    "shop_email": "\nللتواصل: sales@souq-albarakah.com | جوال 0598765412",
    "branch_eg": "\nمتوفر الآن في فرعنا بمدينة نصر، هاتف 01001234567 أو 0223456789",
    "orders_ae": "\nلطلب المنتج تواصل معنا على +971 56 432 1098 أو عبر البريد orders@dxb-home.ae",
    "dates_farm": "\nللطلب: مزارع التمور الفاخرة — جوال 0501478523 — التوصيل لجميع المناطق",
    "home_kitchen": "\nنستقبل طلبات اللقيمات للمناسبات: واتساب 0547896541 (أم عبدالله)",
    "coordinator": "\nالمنسق: أ. سامي — جوال 0566112233 — البريد sami.events@gmail.com",
    "clinic": "\nللحجز والاستفسار: 011 234 5678 تحويلة 4410، البريد sleep.clinic@univ-hospital.med.sa",
    "bottle_en": "\nOrder on WhatsApp: +971 50 112 2334 or email orders@bottle-hub.ae",
    "hotel_en": "\nReservations: +971 4 555 0199 | book@marina-view-hotel.ae",
}
